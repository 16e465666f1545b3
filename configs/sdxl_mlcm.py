"""MLCM on SDXL (LoRA, progressive stages, image-free): `get_config('sdxl' | 'tiny')`.

'sdxl': MLCM's settings (App. A.2): Adam 1e-5, batch 24, 40k iterations, K = 8, k = 20, w = 8.
Point config.student_unet (and optionally config.teacher_unet) at local diffusers-layout SDXL
directories and config.prompts at a local prompt file.
'tiny': a random tiny SDXL-architecture UNet and a hashed-token text stand-in, for CPU tests.
"""
import ml_collections

from configs import common

SIZES = ("sdxl", "tiny")


def get_config(size="sdxl"):
  if size not in SIZES:
    raise ValueError(f"config size {size!r} is not known; allowed: {SIZES}")
  c = ml_collections.ConfigDict()
  c.experiment = "mlcm"
  c.seed = 0
  # Local diffusers-layout SDXL directories, or hub names (org/name) found in the local Hugging
  # Face cache ($HF_HUB_CACHE or $HF_HOME/hub; nothing downloads). The teacher may be another
  # SDXL-architecture checkpoint (MLCM uses a fine-tune); '' = the student's UNet.
  c.student_unet = "/models/stable-diffusion-xl-base-1.0"
  c.teacher_unet = ""
  c.text_encoder = "sdxl"  # 'hashed': tests only (no CLIP weights)
  c.prompts = "/data/laion_aesthetics_6plus.txt"  # .txt / .jsonl / .parquet
  c.latent_resolution = 128  # 1024 px / 8
  c.dtype = "bfloat16"  # UNet compute dtype; the LoRA is float32
  # The UNet (mcm_jax.models.sdxl_unet: diffusers' SDXL UNet with scanned transformer blocks).
  # remat: what the backward pass keeps of each transformer block, one policy or one per level
  # from the finest: 'full' nothing but its input (one extra forward of the blocks), 'dots' its
  # matmuls' outputs, 'none'. Default 'full,full,dots': only the 32 x 32 level (60 of the 70
  # blocks) keeps its matmul outputs; it fits v6e-8 at batch 24 within 1.01x the FLOPs of no
  # remat (--mode=plan; figures in benchmarks/RESULTS.md). attention: 'xla' or 'chunked'
  # (diffusers' memory-efficient attention); frozen_dtype: the frozen base / teacher weights in
  # memory ('float16' holds SDXL's float16 files exactly; with dtype='float32' the UNet is then
  # diffusers' float32 function at half the weight memory).
  # time_cond_proj_dim: the guidance embedding's width of a guidance-conditioned student
  # (mlcm.guidance_range; 256 as diffusers' LCM scripts), added to the student's UNet with a zero
  # projection so that it starts as the teacher's function.
  c.unet = dict(remat="full,full,dots", attention="xla", frozen_dtype="bfloat16",
                time_cond_proj_dim=256)
  # What is trained: 'lora' (MLCM, LCM-LoRA: the UNet frozen) or 'unet' (the whole UNet, LCM §4's
  # full-model students: float32 weights whose Adam state is sharded over the mesh like the
  # frozen teacher's; each stage exports a diffusers UNet directory, unet/, in float16).
  c.trainable = "lora"
  # rank is not given by MLCM; 64 as LCM-LoRA. targets: the UNet's attention projections
  # (= mcm_jax.lora.DEFAULT_TARGETS; configs import only ml_collections). Each stage exports
  # lora/pytorch_lora_weights.safetensors (diffusers) and lora/mlcm_stage<i>_K<K>_kohya.safetensors
  # (ComfyUI / A1111 / kohya) in kohya_dtype ('float16' halves the file; 'float32').
  # init_from: a LoRA file (any layout lora.load reads) to start stage 0 from instead of
  # B = 0, e.g. a distilled student to fine-tune (LCF); its rank and modules must match.
  c.lora = dict(rank=64, scale=1.0, targets=("to_q", "to_k", "to_v", "to_out_0"),
                kohya_dtype="float16", init_from="")
  # Images with captions for mlcm.source='images' (mcm_jax.data.image_captions: in dir, a folder
  # with metadata.jsonl or a caption .txt beside each image, or webdataset .tar shards; or the
  # prepared tfds dataset `tfds` in dir, split `split`, its caption feature caption_key, e.g.
  # 'captions/text' for coco_captions), centre-cropped and resized to latent_resolution * 8,
  # encoded by the SDXL directory's VAE (posterior mean x scaling factor) in the train step, or
  # once into cache_dir and read from there.
  c.images = dict(dir="", cache_dir="", reading=common.reading(), tfds="", split="train",
                  caption_key="caption")
  c.mlcm = dict(
      num_segments=8,                   # K of the first stage
      skip=20,                          # k of the first stage (timesteps)
      num_stages=3,                     # K, K/2, K/4 ...
      guidance_scale=8.0,
      # LCM §4.2's guidance-conditioned student (trainable='unet'): (w_min, w_max) = each
      # example's teacher scale w drawn uniformly and given to the student as
      # guidance.scale_embedding(w - 1) (LCM's omega = w - 1; LCM's [2, 14] is (3.0, 15.0));
      # () = w fixed at guidance_scale, the student unconditioned on it (MLCM, LCM-LoRA).
      guidance_range=(),
      # The guided teacher's unconditional branch: 'auto' = what the SDXL directory's
      # model_index.json says (force_zeros_for_empty_prompt, true for SDXL base: zero prompt
      # embeddings, as diffusers' SDXL pipeline and LCM-SDXL scripts), 'zeros', or
      # 'empty_prompt' (the text encoders' embedding of "").
      uncond="auto",
      # z_{t_m}: image-free 'mdi' (App. Alg. 1) or 'sdi' (one-step ablation), or 'images':
      # real latents noised by the forward process (config.images; the image-based rows of
      # MLCM Table 2, and LCF with teacher_step='data')
      source="mdi",
      teacher_mode="updated",           # later stages: 'updated' (PDU) or 'fixed' (PDF)
      # The teacher's solver over the skip k: 'ddim' (MLCM eq. 8); as options, LCM §4.3's
      # singlestep second-order 'dpm_solver_2' / 'dpmpp_2s' (two teacher calls per pair; LCM
      # pairs them with larger skips, k = 50 in its Fig. 3), MCM's 'addim', and 'data' (with
      # source='images': z_tn from the same latent and noise, no teacher; LCF, LCM Alg. 4).
      # target: 'eq7',
      # or MCM's invDDIM x-target with (SNR + 1) pseudo-Huber weighting ('mcm'; huber_eps 1 as
      # MCM for text-to-image).
      teacher_step="ddim", target="eq7", huber_eps=1.0,
      # the image-free trajectory's steps to z_{t_m}: 'ddim' (MLCM) or 'dpmpp_2m' (DPM-Solver++
      # (2M), LCM §4.3's solver family; more accurate for the same teacher calls)
      trajectory_step="ddim",
      # Stage 0 from a trajectory bank: (z_tm, z_tn) pairs made once by the guided teacher and
      # streamed (no teacher call in the step). dir '' = the teacher runs inside every step.
      bank=dict(dir="", entries=960_000),  # 960k = 40k steps x batch 24
  )
  c.train = common.train_config(
      steps=40_000,  # per stage
      batch_size=24, log_every=50, checkpoint_every=1000, keep_checkpoints=2,
      ema_decay=0.0,  # MLCM uses the stop-gradient student, no EMA
      seed=0, learning_rate=1e-5, warmup_steps=100, b2=0.999)
  # Reward consistency + feedback learning (MLCM 3.4): '' = off, 'aesthetic' = LAION aesthetic
  # predictor on CLIP ViT-L/14 (clip_dir, head), 'imagereward' = ImageReward v1.0
  # (imagereward_dir: ImageReward.pt, med_config.json and bert-base-uncased's vocab.txt, or
  # tokenizer_dir), 'imagereward+aesthetic' = both (MLCM's pair; each loss summed over them).
  # Local files; needs the SDXL directory's VAE to decode. threshold: s0, () = each scorer's
  # (8.0 aesthetic, 2.0 ImageReward), else one number per scorer (--config.rewards.threshold=2.5
  # or ='(2.0, 8.0)'); fl_steps: feedback learning
  # scores the student's one- or two-step sample from noise (the paper's x_0); fl_from_stage:
  # feedback learning from that progressive stage on (the paper: "in the late stages");
  # remat_decoder: the VAE decoder's activations (full-resolution feature maps, the reward
  # step's largest) recomputed in the backward pass instead of stored.
  c.rewards = dict(scorer="", clip_dir="", head="", imagereward_dir="", tokenizer_dir="",
                   rc_weight=1.0, fl_weight=1e-3, threshold=(), fl_steps=1,
                   fl_from_stage=0, remat_decoder=True)
  # The frozen UNet sharded over every chip (fsdp = all, e.g. 8 on v6e-8, 4 on v5p-8); data
  # parallel, the default step does not fit v6e-8 (benchmarks/RESULTS.md).
  c.mesh = common.mesh(data=1, fsdp=-1)
  c.sample = dict(num=8)
  if size == "tiny":  # random tiny UNet, hashed text, built-in prompts
    c.update_from_flattened_dict({
        "student_unet": "", "text_encoder": "hashed", "prompts": "",
        "latent_resolution": 8, "dtype": "float32", "unet.frozen_dtype": "float32",
        "unet.remat": "full",  # the tiny UNet has two levels
        "mesh.data": -1, "mesh.fsdp": 1,  # data parallel: small enough for every device
        "lora.rank": 4,
        "mlcm.num_segments": 4, "mlcm.num_stages": 2, "mlcm.bank.entries": 64,
        "train.steps": 3, "train.batch_size": 8, "train.log_every": 1,
        "train.checkpoint_every": 3, "train.optim.learning_rate": 1e-4,
        "train.optim.warmup_steps": 0,
        "sample.num": 4,
    })
  return c
