"""Config checks that run before anything is compiled; each error names field, value, allowed."""
from mcm_jax import consistency, schedules
from mcm_jax.data import toy as toy_data

CONSISTENCY_METHODS = ("ct", "cd_addim", "cd_ddim")


class ConfigError(ValueError):
  pass


def _check(ok, field, value, allowed):
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def check_in(value, field, allowed):
  """ConfigError ``config.<field>=<value> is invalid; allowed: <allowed>`` unless value in it."""
  _check(value in allowed, field, value, tuple(allowed))


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def validate_train(cfg, prefix):
  for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    _check(_is_int(cfg[key]) and cfg[key] >= 1, f"{prefix}.{key}", cfg[key], "an integer >= 1")
  _check(cfg.checkpoint_every % cfg.log_every == 0, f"{prefix}.checkpoint_every",
         cfg.checkpoint_every, f"a multiple of {prefix}.log_every={cfg.log_every}")
  _check(0.0 <= cfg.ema_decay < 1.0, f"{prefix}.ema_decay", cfg.ema_decay, "0 <= x < 1")
  _check(cfg.optim.learning_rate > 0, f"{prefix}.optim.learning_rate", cfg.optim.learning_rate,
         "> 0")
  _check(cfg.optim.warmup_steps >= 0, f"{prefix}.optim.warmup_steps", cfg.optim.warmup_steps,
         ">= 0")
  _check(cfg.optim.grad_clip >= 0, f"{prefix}.optim.grad_clip", cfg.optim.grad_clip,
         ">= 0 (0 disables clipping)")


def validate_schedule(cfg):
  _check(cfg.name in schedules.SCHEDULES, "schedule.name", cfg.name, schedules.SCHEDULES)
  _check(cfg.logsnr_min < cfg.logsnr_max, "schedule.logsnr_min", cfg.logsnr_min,
         f"< schedule.logsnr_max={cfg.logsnr_max}")


def validate_consistency(cfg, prefix="consistency"):
  """Checks the Alg. 1 fields; ``student_steps`` may be one int or a tuple of them."""
  steps = cfg.student_steps
  steps = (steps,) if _is_int(steps) else tuple(steps)
  _check(len(steps) > 0 and all(_is_int(s) and s >= 1 for s in steps),
         f"{prefix}.student_steps", cfg.student_steps, "integers >= 1")
  _check(cfg.teacher_steps_start >= max(steps), f"{prefix}.teacher_steps_start",
         cfg.teacher_steps_start,
         f">= the largest student step count ({max(steps)}): every student step needs at least "
         "one teacher step")
  _check(cfg.teacher_steps_end >= cfg.teacher_steps_start, f"{prefix}.teacher_steps_end",
         cfg.teacher_steps_end, f">= {prefix}.teacher_steps_start={cfg.teacher_steps_start}")
  _check(cfg.teacher_steps_horizon > 0, f"{prefix}.teacher_steps_horizon",
         cfg.teacher_steps_horizon, "> 0")
  _check(cfg.xvar_frac >= 0, f"{prefix}.xvar_frac", cfg.xvar_frac, ">= 0")
  _check(cfg.huber_eps > 0, f"{prefix}.huber_eps", cfg.huber_eps, "> 0")
  _check(cfg.loss_weight in consistency.LOSS_WEIGHTS, f"{prefix}.loss_weight", cfg.loss_weight,
         tuple(consistency.LOSS_WEIGHTS))


def validate_toy(config):
  """Validates the whole toy config (configs/toy.py)."""
  _check(config.data.name in toy_data.DATASETS and config.data.name != "mixture1d",
         "data.name", config.data.name,
         sorted(k for k in toy_data.DATASETS if k != "mixture1d"))
  validate_schedule(config.schedule)
  for key in ("hidden", "depth"):
    _check(_is_int(config.model[key]) and config.model[key] >= 1, f"model.{key}",
           config.model[key], "an integer >= 1")
  validate_train(config.teacher, "teacher")
  validate_train(config.student, "student")
  validate_consistency(config.consistency)
  methods = tuple(config.consistency.methods)
  _check(len(methods) > 0 and set(methods) <= set(CONSISTENCY_METHODS), "consistency.methods",
         methods, f"a non-empty subset of {CONSISTENCY_METHODS}")
  if config.fig1.enabled:
    steps = tuple(config.fig1.student_steps)
    _check(len(steps) > 0 and all(_is_int(s) and 1 <= s <= config.consistency
                                  .teacher_steps_start for s in steps),
           "fig1.student_steps", steps,
           f"integers in [1, consistency.teacher_steps_start]")
    for key in ("teacher_steps", "student_train_steps"):
      _check(_is_int(config.fig1[key]) and config.fig1[key] >= 1, f"fig1.{key}",
             config.fig1[key], "an integer >= 1")
  _check(_is_int(config.eval.num_samples) and config.eval.num_samples >= 1024
         and config.eval.num_samples % 1024 == 0, "eval.num_samples", config.eval.num_samples,
         "a multiple of 1024")
  _check(_is_int(config.eval.teacher_sampling_steps) and config.eval.teacher_sampling_steps >= 1,
         "eval.teacher_sampling_steps", config.eval.teacher_sampling_steps, "an integer >= 1")
  _check(config.eval.x_var_table_points >= 2, "eval.x_var_table_points",
         config.eval.x_var_table_points, ">= 2")
  _check(config.eval.x_var_eta >= 0, "eval.x_var_eta", config.eval.x_var_eta, ">= 0")
