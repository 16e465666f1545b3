"""Pixel-space MCM on ImageNet (MCM App. A): ``pixel_config(resolution, objective, size)`` builds
``configs/imagenet{64,128}_{base,cd,ct}.py``.

size: 'small' | 'large' (the paper's UViTs) or 'tiny' (the same code path on scikit-learn's
digits at 16x16 with tiny step counts: CPU tests and demo).
"""
import ml_collections

from configs import common

SIZES = ("small", "large", "tiny")


def pixel_config(resolution, objective, size):
  """The paper's settings for ``resolution`` 64 / 128 and ``objective`` 'base' | 'cd' | 'ct'."""
  if size not in SIZES:
    raise ValueError(f"config size {size!r} is not known; allowed: {SIZES}")
  base = objective == "base"
  c = ml_collections.ConfigDict()
  c.experiment = "pixel"
  c.objective = objective  # base (diffusion pre-training), cd or ct
  c.seed = 0
  # name: 'digits' or a tfds dataset prepared as array_record in the local data_dir, e.g.
  # 'imagenet2012' (centre crop + bicubic resize to the resolution) or 'imagenet_resized/64x64'.
  # jpeg_draft: decode JPEGs at a reduced scale first (PIL draft mode; other pixels, less CPU).
  # reading: 4 worker processes of 4 threads decode on each host (the paper's step rates need a
  # few of a pod host's cores: benchmarks/RESULTS.md, "Input pipeline").
  c.data = dict(name="imagenet2012", data_dir="", split="train", resolution=resolution,
                channels=3, num_classes=1000, jpeg_draft=False,
                reading=common.reading(workers=4, threads=4))
  c.model = dict(resolution=resolution, size=size,
                 dtype="bfloat16",  # compute dtype; params stay float32
                 # what each block keeps for the backward pass (mcm_jax.models.remat): 'full'
                 # its input only (one more forward), 'dots' its matmuls' outputs,
                 # 'dots_convs' those and its convolutions' outputs, 'none'.
                 # --mode=plan at batch 2048 (benchmarks/RESULTS.md): 'dots' costs 1.05-1.09x
                 # the FLOPs of no remat ('full' 1.11-1.22x) and fits every paper config: small
                 # on v5e-64 (CD64 14.0 GiB of 16, CT128 13.8, CD128 13.3 at fsdp 4), large on
                 # v5e-256 (CD64 8.0, CD128 9.9). The base128 steps recompute convolutions
                 # worth 1.11x under 'dots' (a base step's ideal is only 3 forwards), so they
                 # keep them: small base128 1.018x, 11.7 GiB at fsdp 4; large 1.009x, 6.9 GiB.
                 remat="dots_convs" if (base and resolution == 128) else "dots")
  # Interpolated cosine: noise resolution 32 -> image resolution (64 or 128).
  # clip_after_shift=False: simple diffusion's formula (the cosine clipped to [-15, 15], then
  # shifted: at 64 / 32, logsnr(0) = 13.61); True keeps the shifted range inside [-15, 15].
  c.schedule = dict(name="interpolated_cosine", image_res=resolution, noise_res_low=32,
                    noise_res_high=resolution, logsnr_min=-15.0, logsnr_max=15.0,
                    clip_after_shift=False)
  c.multiscale_levels = 1 if resolution == 128 else 0  # base loss: one 2x2 average pool at 128
  # Base training replaces a label by the null label (num_classes) with this probability, so the
  # unconditional branch that classifier-free guidance calls is trained. MCM §5.1 guides only
  # the ImageNet128 base model (its samples and CD teacher); the paper gives no rate, 0.1 is Ho &
  # Salimans' (2022) choice for ImageNet 128 (0.1 and 0.2 scored alike there). ImageNet64 runs
  # are unguided, so their base keeps every label.
  c.p_uncond = 0.1 if resolution == 128 else 0.0
  c.train = common.train_config(
      steps=1_000_000 if base else 200_000, batch_size=2048, log_every=100,
      checkpoint_every=5_000, keep_checkpoints=3, ema_decay=0.9999, seed=0,
      learning_rate=1e-4 if base else 2e-5, warmup_steps=10_000)
  # large: the state (params, EMA, Adam, teacher: 23 GiB per chip replicated) sharded 16 ways;
  # --mode=plan, CD64 large at batch 2048 on v5e-256: 8.0 GiB per chip of 16 (fsdp 1: refused).
  # Small CD128 (guided teacher, 'dots'): 4 ways, 13.3 GiB of 16 (fsdp 1: 15.4, over 90%).
  # Small base128 ('dots_convs'): 4 ways, 11.7 GiB (the state alone is 6.1 GiB unsharded).
  small_fsdp = 4 if (resolution == 128 and objective in ("cd", "base")) else 1
  c.mesh = common.mesh(fsdp={"large": 16, "small": small_fsdp}.get(size, 1))
  c.init_from = "" if base else "runs/base"  # the base run's workdir (CT / CD start from its EMA)
  # CT / CD students that also see their position within the segment (a zero-initialised
  # embedding; the toy's fix for the jump of the target at segment boundaries, docs/toy.md).
  c.model.segment_input = False
  c.consistency = dict(
      student_steps=8,   # one student per run (the paper trains 1, 2, 4, 8, 16)
      # N_teacher(i) anneals start -> end (log-linearly) over the first horizon iterations.
      teacher_steps_start=64, teacher_steps_end=1280, teacher_steps_horizon=100_000,
      xvar_frac=0.75, huber_eps=1e-4, loss_weight="snr_plus_one",
      teacher_sampler="addim",
      # Guided teacher for ImageNet128 CD (MCM §5.1: guidance only for the 128 base); the scale
      # is not in the paper. w = 1 means no guidance. The null label is num_classes, which the
      # base run (init_from) must have trained (p_uncond > 0; checked when CD starts).
      guidance_scale=1.5 if (resolution == 128 and objective == "cd") else 1.0,
  )
  c.sample = dict(num=64, teacher_steps=(64, 256),
                  # classifier-free guidance of the base model's samples (grids, --mode=eval);
                  # needs p_uncond > 0. Students sample unguided (CD's teacher carries it).
                  guidance_scale=1.5 if (resolution == 128 and base) else 1.0,
                  # the base model's sampler: 'addim' (MCM Alg. 2 with x_var below) or
                  # 'dpmpp_2m' (DPM-Solver++(2M), the many-step baseline of LCM §4.3)
                  sampler="addim",
                  every=10_000,  # PNG grids every N steps (0: at the end only)
                  # aDDIM x_var for the base model's samples: 'table' = eta mean||x - x_hat||^2/d
                  # measured on data over a t grid (MCM Alg. 3; saved as x_var_table.json),
                  # 'analytic' = 0.1 / (2 + SNR).
                  x_var="table", x_var_eta=0.75, x_var_points=32, x_var_data=2048)
  # --mode=eval: N samples at each step count -> Frechet distance to the data's statistics.
  c.eval = dict(
      # 'inception' (FID; needs inception_weights) or 'digits_classifier' (FD in the hidden
      # layer of a small scikit-learn classifier: meaningful for digits only).
      features="inception",
      inception_weights="",  # local pt_inception-2015-12-05-6726825d.pth or .npz of it
      reference_stats="",    # .npz with mu, sigma (pytorch-fid / ADM format); empty: computed
                             # from data.split into workdir/reference_<features>.npz
      reference_num=50_000,  # data images for computed reference statistics
      num=50_000,            # samples per step count
      batch_size=512,        # sampling / feature batch
      steps=(),  # sampler step counts; () = the student's steps, or sample.teacher_steps (base)
  )
  if size == "tiny":  # digits at 16x16 (model.resolution stays: it picks the UViT's stages)
    c.update_from_flattened_dict({
        "data.name": "digits", "data.resolution": 16, "data.channels": 1,
        "data.num_classes": 10, "data.reading.workers": 0,  # in memory: read in this process
        "model.dtype": "float32", "model.remat": "none",
        "schedule.image_res": 16, "schedule.noise_res_low": 8, "schedule.noise_res_high": 16,
        "train.steps": 30, "train.batch_size": 32, "train.log_every": 10,
        "train.checkpoint_every": 10, "train.ema_decay": 0.9,
        "train.optim.learning_rate": 1e-3, "train.optim.warmup_steps": 5,
        "consistency.student_steps": 4, "consistency.teacher_steps_horizon": 10,
        "sample.num": 16, "sample.teacher_steps": (16,), "sample.every": 0,
        "sample.x_var_data": 256,
        "eval.features": "digits_classifier", "eval.reference_num": 1797, "eval.num": 2048,
    })
  return c
