"""Config checks that run before anything is compiled; each error names field, value, allowed.

``validate(config)`` dispatches on ``config.experiment`` to ``validate_toy`` (configs/toy.py),
``validate_pixel`` (configs/imagenet*.py) or ``validate_mlcm`` (configs/sdxl_mlcm.py). Only light
modules are imported here (jax, numpy, flax through the UViT's stage table; no orbax / optax).
``unknown_field_error`` names a field that a config does not have, with close matches.
"""
import difflib

from mcm_jax import consistency, experiments, fid, mlcm, rewards, schedules
from mcm_jax.models import remat, sdxl_unet
from mcm_jax.config_diff import flat_fields
from mcm_jax.errors import ConfigError
from mcm_jax.data import images as image_data
from mcm_jax.data import toy as toy_data
from mcm_jax.models.uvit import uvit_config

EXPERIMENTS = tuple(experiments.MODULES)
CONSISTENCY_METHODS = ("ct", "cd_addim", "cd_ddim")  # the toy's sweep.methods
PIXEL_OBJECTIVES = ("base", "cd", "ct")  # config.objective of the pixel experiment


def _check(ok, field, value, allowed):
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def check_in(value, field, allowed):
  """ConfigError ``config.<field>=<value> is invalid; allowed: <allowed>`` unless value in it."""
  _check(value in allowed, field, value, tuple(allowed))


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def unknown_field_error(config, field, source="this config"):
  """A ConfigError for ``config.<field>`` when ``config`` has no such field (None when it has
  it, or it is a whole section): the close matches of its first unknown part among the names of
  its deepest existing section, else that section's field names."""
  fields = flat_fields(config)
  if field in fields or any(f.startswith(field + ".") for f in fields):
    return None
  parts = field.split(".")
  depth = max(i for i in range(len(parts))
              if i == 0 or any(f.startswith(".".join(parts[:i]) + ".") for f in fields))
  section, rest = ".".join(parts[:depth]), ".".join(parts[depth + 1:])
  names = sorted({f[len(section) + 1 if section else 0:].split(".")[0] for f in fields
                  if not section or f.startswith(section + ".")})
  matches = []
  for name in difflib.get_close_matches(parts[depth], names, n=3, cutoff=0.6):
    path = ".".join(p for p in (section, name) if p)
    matches.append(f"{path}.{rest}" if rest and (f"{path}.{rest}" in fields) else path)
  hint = (f"did you mean {' or '.join('config.' + m for m in matches)}?" if matches else
          f"config{'.' + section if section else ''} has: {', '.join(names)}")
  return ConfigError(f"config.{field} is not a field of {source}; {hint}")


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
  factor = cfg.get("divergence_factor", 1e3)  # sections built without common.train_config
  _check(_is_number(factor) and factor >= 0, f"{prefix}.divergence_factor", factor,
         "a number >= 0 (0 disables the divergence stop)")


def validate_reading(cfg, prefix):
  """The loader's ``reading`` section (configs/common.py: ``reading``)."""
  for key in ("workers", "threads"):
    _check(_is_int(cfg[key]) and cfg[key] >= 0, f"{prefix}.{key}", cfg[key], "an integer >= 0")


def validate_schedule(cfg):
  _check(cfg.name in schedules.SCHEDULES, "schedule.name", cfg.name, schedules.SCHEDULES)
  _check(cfg.logsnr_min < cfg.logsnr_max, "schedule.logsnr_min", cfg.logsnr_min,
         f"< schedule.logsnr_max={cfg.logsnr_max}")


def validate_consistency(cfg, prefix="consistency", student_steps=None, steps_field=None):
  """Checks the Alg. 1 fields of ``cfg`` (config.<prefix>) for ``student_steps`` (one int or a
  tuple of them, named config.<steps_field> in errors); by default ``cfg.student_steps`` (pixel:
  one student per run). The toy passes its ``sweep.student_steps``."""
  if student_steps is None:
    student_steps, steps_field = cfg.student_steps, f"{prefix}.student_steps"
  steps = (student_steps,) if _is_int(student_steps) else tuple(student_steps)
  _check(len(steps) > 0 and all(_is_int(s) and s >= 1 for s in steps),
         steps_field, student_steps, "integers >= 1")
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
  validate_consistency(config.consistency, student_steps=config.sweep.student_steps,
                       steps_field="sweep.student_steps")
  methods = tuple(config.sweep.methods)
  _check(len(methods) > 0 and set(methods) <= set(CONSISTENCY_METHODS), "sweep.methods",
         methods, f"a non-empty subset of {CONSISTENCY_METHODS}")
  _check(_is_int(config.sweep.num_seeds) and config.sweep.num_seeds >= 1, "sweep.num_seeds",
         config.sweep.num_seeds, "an integer >= 1")
  _check(isinstance(config.model.segment_input, bool), "model.segment_input",
         config.model.segment_input, "True or False")
  if config.fig1.enabled:
    steps = tuple(config.fig1.student_steps)
    _check(len(steps) > 0 and all(_is_int(s) and 1 <= s <= config.consistency
                                  .teacher_steps_start for s in steps),
           "fig1.student_steps", steps,
           "integers in [1, consistency.teacher_steps_start]")
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


def validate_pixel(c, plan=False):
  """Validates a pixel config (configs/pixel.py); ``plan`` (``--mode=plan``): no data is read,
  so no data directory is needed."""
  check_in(c.objective, "objective", PIXEL_OBJECTIVES)
  check_in(c.model.remat, "model.remat", tuple(remat.POLICIES))
  if c.data.name != image_data.DIGITS and not c.data.data_dir and not plan:
    raise ConfigError(f"config.data.data_dir='' is invalid for data.name={c.data.name!r}; "
                      "allowed: the local directory holding the prepared tfds dataset")
  validate_train(c.train, "train")
  validate_reading(c.data.reading, "data.reading")
  if c.objective != "base":
    cc = c.consistency
    validate_consistency(cc)
    check_in(cc.teacher_sampler, "consistency.teacher_sampler", consistency.TEACHER_SAMPLERS)
    if not c.init_from:
      raise ConfigError("config.init_from is empty; CT / CD start from a base run's workdir "
                        "(train one with objective='base' first)")
  check_in(c.sample.x_var, "sample.x_var", ("table", "analytic"))
  check_in(c.sample.sampler, "sample.sampler", ("addim", "dpmpp_2m"))
  _check(isinstance(c.model.segment_input, bool), "model.segment_input", c.model.segment_input,
         "True or False")
  _check(_is_number(c.p_uncond) and 0 <= c.p_uncond < 1, "p_uncond", c.p_uncond,
         "a number in [0, 1) (the probability of dropping a label in base training)")
  w = c.sample.guidance_scale
  _check(_is_number(w) and w >= 0, "sample.guidance_scale", w, "a number >= 0 (1 = no guidance)")
  if w != 1 and c.objective != "base":
    raise ConfigError(f"config.sample.guidance_scale={w!r} is invalid for objective="
                      f"{c.objective!r}; allowed: 1 (students sample unguided; CD's teacher is "
                      "guided by consistency.guidance_scale)")
  if w != 1 and c.objective == "base" and not c.p_uncond:
    raise ConfigError(f"config.sample.guidance_scale={w!r} needs a trained unconditional branch, "
                      f"but config.p_uncond={c.p_uncond!r}; allowed: guidance_scale=1, or "
                      "p_uncond > 0 (e.g. 0.1) from the start of base training")
  check_in(c.eval.features, "eval.features", fid.FEATURES)
  for key in ("num", "batch_size", "reference_num"):
    if not isinstance(c.eval[key], int) or c.eval[key] < 2:
      raise ConfigError(f"config.eval.{key}={c.eval[key]!r} is invalid; allowed: an integer >= 2")
  if any(not isinstance(k, int) or k < 1 for k in c.eval.steps):
    raise ConfigError(f"config.eval.steps={tuple(c.eval.steps)!r} is invalid; allowed: "
                      "integers >= 1 (or () for the default)")
  if c.sample.every and c.sample.every % c.train.log_every:
    raise ConfigError(f"config.sample.every={c.sample.every} is invalid; allowed: 0 or a "
                      f"multiple of train.log_every={c.train.log_every}")
  if c.data.resolution % 2 ** (len(uvit_config(c.model.resolution, c.model.size)["stages"])):
    raise ConfigError(f"config.data.resolution={c.data.resolution} is invalid; allowed: "
                      "a multiple of 2^(number of UViT stages)")


def validate_mlcm(c):
  """Validates an MLCM config (configs/sdxl_mlcm.py)."""
  validate_train(c.train, "train")
  m = c.mlcm
  _check(_is_int(m.num_stages) and m.num_stages >= 1, "mlcm.num_stages", m.num_stages,
         "an integer >= 1")
  if not _is_int(m.num_segments) or m.num_segments < 1 or (
      m.num_segments % 2 ** (m.num_stages - 1)):
    raise ConfigError(f"config.mlcm.num_segments={m.num_segments} is invalid; allowed: an "
                      f"integer divisible by 2^(num_stages - 1) = {2 ** (m.num_stages - 1)}")
  if not _is_int(m.skip) or m.skip < 1 or m.skip >= mlcm.T // m.num_segments:
    raise ConfigError(f"config.mlcm.skip={m.skip} is invalid; allowed: 1 <= k < T/K = "
                      f"{mlcm.T // m.num_segments} (it doubles with K halving)")
  _check(_is_number(m.guidance_scale) and m.guidance_scale >= 0, "mlcm.guidance_scale",
         m.guidance_scale, "a number >= 0 (1 = no guidance)")
  _check(_is_number(m.huber_eps) and m.huber_eps > 0, "mlcm.huber_eps", m.huber_eps, "> 0")
  _check(_is_int(c.lora.rank) and c.lora.rank >= 1, "lora.rank", c.lora.rank, "an integer >= 1")
  _check(_is_number(c.lora.scale) and c.lora.scale != 0, "lora.scale", c.lora.scale,
         "a number other than 0")
  targets = c.lora.targets
  _check(not isinstance(targets, str) and len(targets) > 0
         and all(isinstance(t, str) and t for t in targets), "lora.targets",
         tuple(targets) if not isinstance(targets, str) else targets,
         "a non-empty tuple of Dense module names, e.g. ('to_q', 'to_k', 'to_v', 'to_out_0')")
  _check(_is_int(c.latent_resolution) and c.latent_resolution >= 4
         and c.latent_resolution % 4 == 0, "latent_resolution", c.latent_resolution,
         "a multiple of 4 (pixels / 8; the SDXL UNet halves the latents twice)")
  check_in(c.dtype, "dtype", ("float32", "bfloat16", "float16"))
  check_in(c.lora.kohya_dtype, "lora.kohya_dtype", ("float16", "float32"))
  _check(_is_int(c.sample.num) and c.sample.num >= 1, "sample.num", c.sample.num,
         "an integer >= 1")
  _check(isinstance(c.unet.remat, str) and all(
      n.strip() in remat.POLICIES for n in c.unet.remat.split(",")), "unet.remat", c.unet.remat,
         f"one of {tuple(remat.POLICIES)}, or one per UNet level, comma-separated "
         "(e.g. 'full,full,dots')")
  check_in(c.unet.attention, "unet.attention", sdxl_unet.ATTENTION)
  check_in(c.unet.frozen_dtype, "unet.frozen_dtype", ("float32", "bfloat16", "float16"))
  check_in(m.source, "mlcm.source", mlcm.SOURCES)
  validate_reading(c.images.reading, "images.reading")
  if m.source == "images":
    if not c.images.dir:
      raise ConfigError("config.images.dir is empty, but config.mlcm.source='images' reads "
                        "images with captions from it; allowed: a local or gs:// folder (of "
                        "images with captions, of webdataset .tar shards, or the tfds data_dir "
                        "of images.tfds)")
    if not c.student_unet:
      raise ConfigError("config.mlcm.source='images' needs config.student_unet: images are "
                        "encoded by the SDXL directory's VAE")
    if m.bank.dir:
      raise ConfigError(f"config.mlcm.bank.dir={m.bank.dir!r} holds image-free pairs, but "
                        "config.mlcm.source='images'; allowed: bank.dir='' with images")
  elif c.images.dir:
    raise ConfigError(f"config.images.dir={c.images.dir!r} is set, but config.mlcm.source="
                      f"{m.source!r} reads no images; allowed: source='images', or images.dir=''")
  if m.teacher_step == mlcm.DATA_STEP and m.source != "images":
    raise ConfigError(f"config.mlcm.teacher_step='data' (LCF: z_tn from the data) needs "
                      f"config.mlcm.source='images', not {m.source!r}")
  check_in(m.uncond, "mlcm.uncond", ("auto", "zeros", "empty_prompt"))
  if m.bank.dir and (not isinstance(m.bank.entries, int) or m.bank.entries < c.train.batch_size):
    raise ConfigError(f"config.mlcm.bank.entries={m.bank.entries!r} is invalid; allowed: an "
                      f"integer >= train.batch_size={c.train.batch_size}")
  check_in(m.teacher_step, "mlcm.teacher_step", mlcm.TEACHER_STEPS + (mlcm.DATA_STEP,))
  check_in(m.trajectory_step, "mlcm.trajectory_step", mlcm.TRAJECTORY_STEPS)
  check_in(m.target, "mlcm.target", mlcm.TARGETS)
  check_in(m.teacher_mode, "mlcm.teacher_mode", mlcm.TEACHER_MODES)
  validate_student(c)
  r = c.rewards
  names = rewards.scorer_names(r.scorer) if isinstance(r.scorer, str) else (r.scorer,)
  known = tuple(rewards.THRESHOLDS)
  _check(all(n in known for n in names) and len(set(names)) == len(names), "rewards.scorer",
         r.scorer, f"'' (none), one of {known} or several joined by '+', e.g. "
         "'imagereward+aesthetic'")
  if names and not c.student_unet:
    raise ConfigError("config.rewards.scorer needs config.student_unet: rewards score images "
                      "decoded by the SDXL directory's VAE")
  if "aesthetic" in names:
    for key in ("clip_dir", "head"):
      _check(bool(r[key]), f"rewards.{key}", r[key],
             "a local path (the CLIP ViT-L/14 directory / the aesthetic head's weights)")
  if "imagereward" in names:
    _check(bool(r.imagereward_dir), "rewards.imagereward_dir", r.imagereward_dir,
           "a local directory with ImageReward.pt and med_config.json")
  if names:
    for key in ("rc_weight", "fl_weight"):
      _check(_is_number(r[key]) and r[key] >= 0, f"rewards.{key}", r[key], "a number >= 0")
    t = r.threshold
    _check(t is None or (_is_number(t) and len(names) == 1) or (
        isinstance(t, (list, tuple)) and len(t) in (0, len(names)) and all(map(_is_number, t))),
           "rewards.threshold", t, f"() for each scorer's s0, or one number per scorer "
           f"({len(names)}: {'+'.join(names)})")
    check_in(r.fl_steps, "rewards.fl_steps", (1, 2))
    start = r.get("fl_from_stage", 0)
    _check(isinstance(start, int) and start >= 0, "rewards.fl_from_stage", start,
           "an integer >= 0 (feedback learning from that stage on)")
    check_in(r.get("remat_decoder", True), "rewards.remat_decoder", (True, False))
  check_in(c.text_encoder, "text_encoder", ("hashed", "sdxl"))


def validate_student(c):
  """What is trained (``trainable``) and LCM's guidance-conditioned student
  (``mlcm.guidance_range``)."""
  check_in(c.trainable, "trainable", ("lora", "unet"))
  w = c.mlcm.guidance_range
  if not w:
    return
  _check(not isinstance(w, str) and len(w) == 2 and all(_is_number(x) for x in w)
         and 1 <= w[0] <= w[1], "mlcm.guidance_range", w,
         "() or (w_min, w_max) with 1 <= w_min <= w_max (LCM's omega + 1; its [2, 14] is "
         "(3.0, 15.0))")
  if c.trainable != "unet":
    raise ConfigError(f"config.mlcm.guidance_range={tuple(w)} conditions the student on w "
                      "through a new embedding that a LoRA cannot train; allowed: "
                      "trainable='unet', or guidance_range=()")
  if c.mlcm.bank.dir:
    raise ConfigError(f"config.mlcm.bank.dir={c.mlcm.bank.dir!r}: a trajectory bank is made at "
                      "the fixed guidance_scale; allowed: bank.dir='' with guidance_range")
  _check(_is_int(c.unet.time_cond_proj_dim) and c.unet.time_cond_proj_dim >= 4,
         "unet.time_cond_proj_dim", c.unet.time_cond_proj_dim, "an integer >= 4")


def validate(config, plan=False):
  """Validates any experiment's config; ConfigError naming the field, value and what is allowed.
  ``plan``: for ``--mode=plan`` (compiled only: data paths are not needed)."""
  check_in(config.get("experiment"), "experiment", EXPERIMENTS)
  if config.experiment == "pixel":
    validate_pixel(config, plan)
  else:
    {"toy": validate_toy, "mlcm": validate_mlcm}[config.experiment](config)


def validate_batch_split(batch_size, mesh_shape, where):
  """ConfigError unless ``train.batch_size`` splits evenly over the data-parallel devices (the
  batch is split over every mesh axis: ``mesh_shape`` {'data': d, 'fsdp': f}) of ``where``."""
  n = mesh_shape["data"] * mesh_shape["fsdp"]
  if batch_size % n:
    raise ConfigError(f"config.train.batch_size={batch_size} is invalid for {where}: the batch is "
                      f"split over data x fsdp = {mesh_shape['data']} x {mesh_shape['fsdp']} = "
                      f"{n} devices; allowed: a multiple of {n}")
