"""The embedded CPU default: a toy reproduction of Multistep Consistency Models.

Trains a diffusion teacher (MLP, v-prediction, SNR+1 weighting) on a 2-D distribution, then
CT students and CD students (aDDIM and DDIM teacher) for several student step counts, all
initialised from the teacher; plus the 1-D two-Gaussian mixture of MCM Fig. 1.
``get_config('tiny')`` is the same pipeline with tiny step counts (tests).
"""
import ml_collections


def train_config(steps, batch_size, learning_rate, warmup_steps, ema_decay, log_every,
                 seed):
  return ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=batch_size,
      log_every=log_every,
      fuse_steps=True,  # scan log_every steps in one jitted call: far less dispatch for an MLP
      checkpoint_every=10 * log_every,  # must be a multiple of log_every
      keep_checkpoints=2,
      ema_decay=ema_decay,          # the EMA parameters are the ones evaluated
      seed=seed,
      optim=dict(learning_rate=learning_rate, warmup_steps=warmup_steps, grad_clip=1.0,
                 b1=0.9, b2=0.99, weight_decay=0.0),
  ))


def get_config(arg=None):
  size = arg or "default"
  if size not in ("default", "tiny"):
    raise ValueError(f"toy config argument {size!r} is not known; allowed: 'default', 'tiny'")
  tiny = size == "tiny"
  c = ml_collections.ConfigDict()
  c.experiment = "toy"
  c.seed = 0
  # 2-D dataset: one of ring8, checkerboard, moons, swissroll (mcm_jax.data.toy.DATASETS).
  c.data = dict(name="ring8")
  c.schedule = dict(name="cosine", logsnr_min=-15.0, logsnr_max=15.0)
  c.model = dict(hidden=32 if tiny else 128, depth=1 if tiny else 3)
  c.teacher = train_config(steps=40 if tiny else 24_000, batch_size=64 if tiny else 256,
                           learning_rate=2e-3, warmup_steps=10 if tiny else 500,
                           ema_decay=0.999, log_every=20 if tiny else 500, seed=0)
  c.student = train_config(steps=20 if tiny else 4_000, batch_size=64 if tiny else 256,
                           learning_rate=5e-4, warmup_steps=5 if tiny else 200,
                           ema_decay=0.999, log_every=10 if tiny else 500, seed=1)
  c.consistency = dict(
      student_steps=(1, 2) if tiny else (1, 2, 4, 8, 16),
      # ct: consistency training; cd_addim / cd_ddim: distillation with an aDDIM / DDIM teacher.
      methods=("ct", "cd_addim") if tiny else ("ct", "cd_addim", "cd_ddim"),
      # N_teacher(i) = exp(log start + clip(i / horizon, 0, 1) (log end - log start)); the paper
      # anneals 64 -> 1280 over 100k of 200k iterations, i.e. over half the run.
      teacher_steps_start=64,
      teacher_steps_end=1280,
      teacher_steps_horizon=10 if tiny else 2_000,
      xvar_frac=0.75,   # x_var = xvar_frac ||x_teacher - x||^2 / d for the aDDIM teacher
      huber_eps=1e-4,   # pseudo-Huber epsilon of the loss
      loss_weight="snr_plus_one",  # w(t); or sqrt_snr_plus_one (see consistency.LOSS_WEIGHTS)
  )
  # The 1-D mixture of MCM Fig. 1: its own teacher and CD (aDDIM) students, for the figure.
  c.fig1 = dict(
      enabled=True,
      student_steps=(1, 2, 4),
      teacher_steps=20 if tiny else 6_000,
      student_train_steps=10 if tiny else 2_000,
  )
  c.eval = dict(
      num_samples=2048 if tiny else 16_384,  # a multiple of 1024 (energy distance blocks)
      teacher_sampling_steps=16 if tiny else 512,   # the aDDIM / DDIM teacher baselines
      x_var_table_points=8 if tiny else 64,  # aDDIM x_var table from data (MCM Alg. 3)
      x_var_eta=0.75,
      seed=1234,
  )
  return c
