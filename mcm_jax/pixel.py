"""Pixel-space MCM: UViT base diffusion, then multistep CT / CD from the base checkpoint
(SPEC sections 4-5, MCM App. A), on the sharded training loop.

``default_config(resolution, size, objective)`` builds the configs in ``configs/imagenet*.py``;
size 'tiny' runs the same path on scikit-learn's digits at 16x16 (CPU tests and demo).
"""
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mcm_jax import checkpoint, consistency, diffusion, parameterization, plotting, schedules
from mcm_jax import sharding, train
from mcm_jax.config_validation import ConfigError, validate_consistency, validate_train
from mcm_jax.data import images as image_data
from mcm_jax.metric_writer import create_writer
from mcm_jax.models.uvit import UViT, uvit_config
from mcm_jax.samplers import addim

OBJECTIVES = ("base", "cd", "ct")


def default_config(resolution, size, objective):
  """The paper's settings (MCM App. A); ``size='tiny'`` swaps in digits at 16x16 and tiny steps."""
  tiny = size == "tiny"
  c = ml_collections.ConfigDict()
  c.experiment = "pixel"
  c.objective = objective  # base (diffusion pre-training), cd or ct
  c.seed = 0
  c.data = dict(name="digits" if tiny else "imagenet", data_dir="",  # tfds data dir (imagenet)
                resolution=16 if tiny else resolution, channels=1 if tiny else 3,
                num_classes=10 if tiny else 1000)
  c.model = dict(resolution=resolution, size=size,
                 dtype="float32" if tiny else "bfloat16",  # compute dtype; params stay float32
                 remat=not tiny)  # rematerialise blocks in the backward pass (memory)
  image_res = c.data.resolution
  # Interpolated cosine: noise resolution 32 -> image resolution (64 or 128); tiny: 8 -> 16.
  c.schedule = dict(name="interpolated_cosine", image_res=image_res,
                    noise_res_low=image_res // 2 if tiny else 32, noise_res_high=image_res,
                    logsnr_min=-15.0, logsnr_max=15.0)
  c.multiscale_levels = 1 if resolution == 128 else 0  # base loss: one 2x2 average pool at 128
  base = objective == "base"
  c.train = ml_collections.ConfigDict(dict(
      steps=30 if tiny else (1_000_000 if base else 200_000),
      batch_size=32 if tiny else 2048,
      log_every=10 if tiny else 100,
      checkpoint_every=10 if tiny else 5_000,
      keep_checkpoints=3,
      ema_decay=0.9 if tiny else 0.9999,
      seed=0,
      optim=dict(learning_rate=1e-3 if tiny else (1e-4 if base else 2e-5),
                 warmup_steps=5 if tiny else 10_000, grad_clip=1.0, b1=0.9, b2=0.99,
                 weight_decay=0.0),
  ))
  c.mesh = dict(data=-1, fsdp=1)  # -1: all remaining devices; fsdp > 1 shards parameters
  c.init_from = "" if base else "runs/base"  # the base run's workdir (CT / CD start from its EMA)
  c.consistency = dict(
      student_steps=4 if tiny else 8,   # one student per run (the paper trains 1, 2, 4, 8, 16)
      teacher_steps_start=64, teacher_steps_end=1280,
      teacher_steps_horizon=10 if tiny else 100_000,
      xvar_frac=0.75, huber_eps=1e-4, loss_weight="snr_plus_one",
      teacher_sampler="addim",
      # Guided teacher for ImageNet128 CD (SPEC: CFG only for the 128 base); the scale is not in
      # the paper. w = 1 means no guidance. The null label is num_classes.
      guidance_scale=1.5 if (resolution == 128 and objective == "cd") else 1.0,
  )
  c.sample = dict(num=16 if tiny else 64, teacher_steps=(16,) if tiny else (64, 256),
                  # aDDIM x_var for the base model's samples: 'table' = eta mean||x - x_hat||^2/d
                  # measured on data over a t grid (MCM Alg. 3; saved as x_var_table.json),
                  # 'analytic' = 0.1 / (2 + SNR).
                  x_var="table", x_var_eta=0.75, x_var_points=32,
                  x_var_data=256 if tiny else 2048)
  return c


def _validate(c):
  if c.objective not in OBJECTIVES:
    raise ConfigError(f"config.objective={c.objective!r} is invalid; allowed: {OBJECTIVES}")
  if c.data.name not in image_data.DATASETS:
    raise ConfigError(f"config.data.name={c.data.name!r} is invalid; allowed: "
                      f"{image_data.DATASETS}")
  validate_train(c.train, "train")
  if c.objective != "base":
    cc = c.consistency
    validate_consistency(cc)
    if cc.teacher_sampler not in consistency.TEACHER_SAMPLERS:
      raise ConfigError(f"config.consistency.teacher_sampler={cc.teacher_sampler!r} is invalid; "
                        f"allowed: {consistency.TEACHER_SAMPLERS}")
    if not c.init_from:
      raise ConfigError(f"config.init_from is empty; CT / CD start from a base run's workdir "
                        f"(train one with objective='base' first)")
  if c.sample.x_var not in ("table", "analytic"):
    raise ConfigError(f"config.sample.x_var={c.sample.x_var!r} is invalid; allowed: "
                      "('table', 'analytic')")
  if c.data.resolution % 2 ** (len(uvit_config(c.model.resolution, c.model.size)["stages"])):
    raise ConfigError(f"config.data.resolution={c.data.resolution} is invalid; allowed: "
                      "a multiple of 2^(number of UViT stages)")


def build(c):
  """(model, logsnr_fn, denoise) for a config."""
  kw = uvit_config(c.model.resolution, c.model.size)
  kw.update(num_classes=c.data.num_classes, out_channels=c.data.channels,
            dtype=jnp.dtype(c.model.dtype), remat=c.model.remat)
  model = UViT(**kw)
  s = c.schedule
  logsnr_fn = schedules.get_logsnr_fn(
      s.name, image_res=s.image_res, noise_res_low=s.noise_res_low,
      noise_res_high=s.noise_res_high, logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max)

  def apply_fn(params, z, logsnr, cond, rng):
    if rng is None:
      return model.apply(params, z, logsnr, cond)
    return model.apply(params, z, logsnr, cond, train=True, rngs={"dropout": rng})

  return model, logsnr_fn, parameterization.make_denoiser(apply_fn, logsnr_fn, "v")


def load_teacher_params(init_from, like_params):
  """The EMA parameters of the latest checkpoint in ``init_from`` (a base run's workdir),
  checked against ``like_params``; errors name the path or the mismatching parameter."""
  directory = os.path.join(init_from, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.init_from={init_from!r} has no checkpoints/ directory; "
                            "train the base model there first")
  manager = checkpoint.make_manager(directory, async_save=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.init_from={init_from!r}: no finished checkpoint in "
                              f"{directory}")
    checkpoint.check_stored(manager, step, like_params, subtree="ema_params")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  logging.info("teacher: EMA parameters of %s step %d", directory, step)
  return jax.tree_util.tree_map(jnp.asarray, restored["ema_params"])


def run(config, workdir):
  """Trains (base / CT / CD) and writes sample grids; returns {'samples': [PNG paths]}."""
  _validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  images, labels = image_data.load(c.data.name, c.data.resolution, c.data.data_dir)
  model, logsnr_fn, denoise = build(c)
  res, ch = c.data.resolution, c.data.channels
  params = model.init(jax.random.PRNGKey(c.seed), jnp.zeros((1, res, res, ch)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))
  if c.objective == "base":
    loss = functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=logsnr_fn,
                             multiscale_levels=c.multiscale_levels)
    frozen = None
  else:
    params = frozen = load_teacher_params(c.init_from, params)
    cc = c.consistency
    loss = functools.partial(
        consistency.consistency_loss, denoise_fn=denoise, logsnr_fn=logsnr_fn,
        student_steps=cc.student_steps, teacher_fn=denoise if c.objective == "cd" else None,
        teacher_sampler=cc.teacher_sampler, teacher_steps_start=cc.teacher_steps_start,
        teacher_steps_end=cc.teacher_steps_end, teacher_steps_horizon=cc.teacher_steps_horizon,
        xvar_frac=cc.xvar_frac, huber_eps=cc.huber_eps, loss_weight=cc.loss_weight,
        guidance_scale=cc.guidance_scale, null_cond=c.data.num_classes)
  writer = create_writer(workdir)
  batch_fn = image_data.host_batch_fn(images, labels, c.train.batch_size, c.seed)
  state = train.train(loss, params, None, c.train, workdir, frozen=frozen, writer=writer,
                      name=c.objective, mesh=mesh, host_batch_fn=batch_fn)
  paths = write_samples(c, state.ema_params, denoise, logsnr_fn, workdir, int(state.step),
                        (images, labels))
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "samples.json"), "w") as f:
      json.dump({"step": int(state.step), "samples": paths}, f, indent=1)
  return {"samples": paths}


def x_var_table(c, params, denoise, logsnr_fn, data, workdir):
  """aDDIM x_var(t) on a grid, from ``c.sample.x_var_data`` data images (MCM Alg. 3); written to
  ``workdir/x_var_table.json`` as {"t": [...], "x_var": [...]}."""
  images, labels = data
  n = min(c.sample.x_var_data, len(images))
  x, y = jnp.asarray(images[:n]), jnp.asarray(labels[:n])
  f = lambda z, t: denoise(params, z, t, y)
  t_grid, values = jax.jit(addim.estimate_x_var_table, static_argnums=(0, 2, 4))(
      f, x, logsnr_fn, jax.random.PRNGKey(c.seed + 7), c.sample.x_var_points, c.sample.x_var_eta)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "x_var_table.json"), "w") as fh:
      json.dump({"t": np.asarray(t_grid).tolist(), "x_var": np.asarray(values).tolist(),
                 "eta": c.sample.x_var_eta, "num_images": n}, fh)
  return addim.table_x_var(t_grid, values)


def write_samples(c, params, denoise, logsnr_fn, workdir, step, data):
  """PNG grids: the student with its own steps (Alg. 2), or the base model with aDDIM."""
  n, res, ch = c.sample.num, c.data.resolution, c.data.channels
  z = jax.random.normal(jax.random.PRNGKey(c.seed + 99), (n, res, res, ch))
  labels = jnp.arange(n) % c.data.num_classes
  f = lambda zz, t: denoise(params, zz, t, labels)
  sample = jax.jit(lambda zz, steps, x_var_fn=None: addim.sample(f, zz, steps, logsnr_fn,
                                                                 x_var_fn),
                   static_argnums=(2,))
  if c.objective == "base":
    x_var_fn = (x_var_table(c, params, denoise, logsnr_fn, data, workdir)
                if c.sample.x_var == "table" else addim.analytic_x_var_fn)
    runs = [(f"addim_{s}", s, x_var_fn) for s in c.sample.teacher_steps]
  else:
    runs = [(f"{c.objective}_{c.consistency.student_steps}", c.consistency.student_steps, None)]
  paths = []
  for name, steps, x_var_fn in runs:
    x = sample(z, steps, x_var_fn)  # every process runs it (params may span hosts)
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    path = os.path.join(workdir, f"samples_{name}_step{step}.png")
    if jax.process_index() == 0:
      plotting.image_grid(path, np.asarray(x))
    paths.append(path)
  return paths
