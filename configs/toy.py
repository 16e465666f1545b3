"""The embedded CPU default: a toy reproduction of Multistep Consistency Models.

Trains a diffusion teacher (MLP, v-prediction, SNR+1 weighting) on a 2-D distribution, then
CT students and CD students (aDDIM and DDIM teacher) for several student step counts, all
initialised from the teacher; plus the 1-D two-Gaussian mixture of MCM Fig. 1.
``get_config('tiny')`` is the same pipeline with tiny step counts (tests).
"""
import ml_collections

from configs import common

SIZES = ("default", "tiny")


def get_config(arg=None):
  size = arg or "default"
  if size not in SIZES:
    raise ValueError(f"toy config argument {size!r} is not known; allowed: 'default', 'tiny'")
  c = ml_collections.ConfigDict()
  c.experiment = "toy"
  c.seed = 0
  # 2-D dataset: one of ring8, checkerboard, moons, swissroll (mcm_jax.data.toy.DATASETS).
  c.data = dict(name="ring8")
  c.schedule = dict(name="cosine", logsnr_min=-15.0, logsnr_max=15.0)
  # segment_input: students also see their position within the segment (MCM's target jumps at
  # each segment boundary, and with t alone the network smooths across the jump). The teacher
  # never does. docs/toy.md, "The segment input".
  c.model = dict(hidden=128, depth=3, segment_input=True)
  c.teacher = common.train_config(
      steps=24_000, batch_size=256, log_every=500, fuse_steps=True, checkpoint_every=5_000,
      keep_checkpoints=2, ema_decay=0.999, seed=0, learning_rate=2e-3, warmup_steps=500)
  # No gradient clipping for the students: at 1.0 it acts on most steps and costs the 1- and
  # 2-step students most (docs/toy.md, "Ablations").
  c.student = common.train_config(
      steps=4_000, batch_size=256, log_every=500, fuse_steps=True, checkpoint_every=5_000,
      keep_checkpoints=2, ema_decay=0.999, seed=1, learning_rate=5e-4, warmup_steps=200,
      grad_clip=0.0)
  # MCM Alg. 1, shared by every student of the sweep (same fields as the pixel config's).
  c.consistency = dict(
      # N_teacher(i) = exp(log start + clip(i / horizon, 0, 1) (log end - log start)); the paper
      # anneals 64 -> 1280 over 100k of 200k iterations, i.e. over half the run.
      teacher_steps_start=64,
      teacher_steps_end=1280,
      teacher_steps_horizon=2_000,
      xvar_frac=0.75,   # x_var = xvar_frac ||x_teacher - x||^2 / d for the aDDIM teacher
      huber_eps=1e-4,   # pseudo-Huber epsilon of the loss
      loss_weight="snr_plus_one",  # w(t); or sqrt_snr_plus_one (see consistency.LOSS_WEIGHTS)
  )
  # The students trained and tabulated: one per (method, student step count).
  c.sweep = dict(
      student_steps=(1, 2, 4, 8, 16),  # each <= consistency.teacher_steps_start
      # ct: consistency training; cd_addim / cd_ddim: distillation with an aDDIM / DDIM teacher.
      methods=("ct", "cd_addim", "cd_ddim"),
      # Students per (method, steps), trained with seeds student.seed + 0, 1, ...; the table
      # shows mean ± half the range. README command 1 trains one (launch/toy_seeds.sh: 3).
      num_seeds=1,
  )
  # The 1-D mixture of MCM Fig. 1: its own teacher and CD (aDDIM) students, for the figure.
  c.fig1 = dict(
      enabled=True,
      student_steps=(1, 2, 4),
      teacher_steps=6_000,
      student_train_steps=2_000,
  )
  c.eval = dict(
      num_samples=16_384,  # a multiple of 1024 (energy distance blocks)
      teacher_sampling_steps=512,  # the aDDIM / DDIM teacher baselines
      x_var_table_points=64,  # aDDIM x_var table from data (MCM Alg. 3)
      x_var_eta=0.75,
      seed=1234,
  )
  if size == "tiny":  # the same pipeline in seconds
    c.update_from_flattened_dict({
        "model.hidden": 32, "model.depth": 1,
        "teacher.steps": 40, "teacher.batch_size": 64, "teacher.log_every": 20,
        "teacher.checkpoint_every": 200, "teacher.optim.warmup_steps": 10,
        "student.steps": 20, "student.batch_size": 64, "student.log_every": 10,
        "student.checkpoint_every": 100, "student.optim.warmup_steps": 5,
        "consistency.teacher_steps_horizon": 10,
        "sweep.student_steps": (1, 2), "sweep.methods": ("ct", "cd_addim"),
        "fig1.teacher_steps": 20, "fig1.student_train_steps": 10,
        "eval.num_samples": 2048, "eval.teacher_sampling_steps": 16,
        "eval.x_var_table_points": 8,
    })
  return c
