"""Pixel-space MCM: UViT base diffusion, then multistep CT / CD from the base checkpoint
(SPEC sections 4-5, MCM App. A), on the sharded training loop.

``default_config(resolution, size, objective)`` builds the configs in ``configs/imagenet*.py``;
size 'tiny' runs the same path on scikit-learn's digits at 16x16 (CPU tests and demo).

``run`` trains; ``evaluate`` (``--mode=eval``) measures FID (or FD-digits for 'tiny') of N samples
at each step count against reference statistics of the data.
"""
import functools
import json
import logging
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mcm_jax import checkpoint, consistency, diffusion, fid, parameterization, plotting
from mcm_jax import schedules, sharding, train
from mcm_jax.config_validation import ConfigError, check_in, validate_consistency
from mcm_jax.config_validation import validate_train
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
  # name: 'digits' or a tfds dataset prepared as array_record in the local data_dir, e.g.
  # 'imagenet2012' (centre crop + bicubic resize to the resolution) or 'imagenet_resized/64x64'.
  c.data = dict(name="digits" if tiny else "imagenet2012", data_dir="", split="train",
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
                  every=0 if tiny else 10_000,  # PNG grids every N steps (0: at the end only)
                  # aDDIM x_var for the base model's samples: 'table' = eta mean||x - x_hat||^2/d
                  # measured on data over a t grid (MCM Alg. 3; saved as x_var_table.json),
                  # 'analytic' = 0.1 / (2 + SNR).
                  x_var="table", x_var_eta=0.75, x_var_points=32,
                  x_var_data=256 if tiny else 2048)
  # --mode=eval: N samples at each step count -> Frechet distance to the data's statistics.
  c.eval = dict(
      # 'inception' (FID; needs inception_weights) or 'digits_classifier' (FD in the hidden
      # layer of a small scikit-learn classifier: meaningful for digits only).
      features="digits_classifier" if tiny else "inception",
      inception_weights="",  # local pt_inception-2015-12-05-6726825d.pth or .npz of it
      reference_stats="",    # .npz with mu, sigma (pytorch-fid / ADM format); empty: computed
                             # from data.split into workdir/reference_<features>.npz
      reference_num=1797 if tiny else 50_000,  # data images for computed reference statistics
      num=2048 if tiny else 50_000,            # samples per step count
      batch_size=512 if tiny else 512,         # sampling / feature batch
      steps=(),  # sampler step counts; () = the student's steps, or sample.teacher_steps (base)
  )
  return c


def _validate(c):
  check_in(c.objective, "objective", OBJECTIVES)
  if c.data.name != image_data.DIGITS and not c.data.data_dir:
    raise ConfigError(f"config.data.data_dir='' is invalid for data.name={c.data.name!r}; "
                      "allowed: the local directory holding the prepared tfds dataset")
  validate_train(c.train, "train")
  if c.objective != "base":
    cc = c.consistency
    validate_consistency(cc)
    check_in(cc.teacher_sampler, "consistency.teacher_sampler", consistency.TEACHER_SAMPLERS)
    if not c.init_from:
      raise ConfigError(f"config.init_from is empty; CT / CD start from a base run's workdir "
                        f"(train one with objective='base' first)")
  check_in(c.sample.x_var, "sample.x_var", ("table", "analytic"))
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


def abstract_params(model, c, mesh=None):
  """ShapeDtypeStructs of the model's parameters (no memory), sharded over ``mesh`` if given."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(c.seed), *_dummy_inputs(c))
  if mesh is None:
    return shapes
  return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                shapes, sharding.tree_shardings(shapes, mesh))


def load_ema_params(run_dir, like, what="config.init_from"):
  """(EMA parameters, step) of the latest checkpoint in ``run_dir`` (a run's workdir), shaped and
  sharded like ``like``. Only the ``ema_params`` entry is read (partial restore), each host its
  own shards. Errors name the path or the mismatching parameter."""
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what}={run_dir!r} has no checkpoints/ directory; train the "
                            "model there first")
  manager = checkpoint.make_manager(directory, async_save=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what}={run_dir!r}: no finished checkpoint in {directory}")
    params = checkpoint.restore_subtree(manager, step, "ema_params", like)
  finally:
    manager.close()
  logging.info("EMA parameters of %s step %d", directory, step)
  return params, step


def load_teacher_params(init_from, like_params):
  """The EMA parameters of the base run in ``init_from`` (see ``load_ema_params``)."""
  return load_ema_params(init_from, like_params)[0]


def run(config, workdir):
  """Trains (base / CT / CD) and writes sample grids; returns {'samples': [PNG paths]}."""
  _validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  source = image_data.load(c.data.name, c.data.resolution, c.data.data_dir, c.data.split)
  model, logsnr_fn, denoise = build(c)
  if c.objective == "base":
    params = model.init(jax.random.PRNGKey(c.seed),
                        *(jnp.zeros(x.shape, x.dtype) for x in _dummy_inputs(c)))
    loss = functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=logsnr_fn,
                             multiscale_levels=c.multiscale_levels)
    frozen = None
  else:
    params = frozen = load_teacher_params(c.init_from, abstract_params(model, c, mesh))
    cc = c.consistency
    loss = functools.partial(
        consistency.consistency_loss, denoise_fn=denoise, logsnr_fn=logsnr_fn,
        student_steps=cc.student_steps, teacher_fn=denoise if c.objective == "cd" else None,
        teacher_sampler=cc.teacher_sampler, teacher_steps_start=cc.teacher_steps_start,
        teacher_steps_end=cc.teacher_steps_end, teacher_steps_horizon=cc.teacher_steps_horizon,
        xvar_frac=cc.xvar_frac, huber_eps=cc.huber_eps, loss_weight=cc.loss_weight,
        guidance_scale=cc.guidance_scale, null_cond=c.data.num_classes)
  writer = create_writer(workdir)
  batch_fn = image_data.host_batch_fn(source, c.train.batch_size, c.seed)
  data_spec = dict(dataset=c.data.name, split=c.data.split, resolution=c.data.resolution,
                   num_examples=len(source), global_batch=c.train.batch_size, seed=c.seed)
  samplers = make_samplers(c, denoise, logsnr_fn)
  grids = lambda step, st: write_samples(c, st.ema_params, samplers, workdir, step, source, mesh)
  state = train.train(loss, params, None, c.train, workdir, frozen=frozen, writer=writer,
                      name=c.objective, mesh=mesh, host_batch_fn=batch_fn, data_spec=data_spec,
                      periodic=[(c.sample.every, grids)] if c.sample.every else [])
  paths = grids(int(state.step), state)
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "samples.json"), "w") as f:
      json.dump({"step": int(state.step), "samples": paths}, f, indent=1)
  return {"samples": paths}


def _dummy_inputs(c):
  res, ch = c.data.resolution, c.data.channels
  return (jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))


def _subset_indices(source, n, seed, salt):
  """Sorted indices of ``n`` data examples: a seeded random subset, the same on every host."""
  return np.sort(np.random.default_rng([seed, salt]).permutation(len(source))[:n])


def _data_subset(source, n, seed):
  """``n`` data images (a seeded random subset, the same on every host)."""
  return source.get(_subset_indices(source, n, seed, 12345))


def x_var_table(c, params, samplers, source, workdir, ckpt_step):
  """(t grid, x_var) of aDDIM, measured on ``c.sample.x_var_data`` data images (MCM Alg. 3) for
  the parameters of checkpoint ``ckpt_step``; written to ``workdir/x_var_table.json`` as
  {"t": [...], "x_var": [...], "step": ...} and reused from there for the same step."""
  path = os.path.join(workdir, "x_var_table.json")
  if os.path.isfile(path):
    with open(path) as fh:
      table = json.load(fh)
    if (table.get("step") == ckpt_step and len(table["t"]) == c.sample.x_var_points
        and table["eta"] == c.sample.x_var_eta):
      return jnp.asarray(table["t"]), jnp.asarray(table["x_var"])
  images, labels = _data_subset(source, min(c.sample.x_var_data, len(source)), c.seed)
  t_grid, values = samplers.estimate_x_var(params, jnp.asarray(images), jnp.asarray(labels),
                                           jax.random.PRNGKey(c.seed + 7))
  if jax.process_index() == 0:
    with open(path, "w") as fh:
      json.dump({"t": np.asarray(t_grid).tolist(), "x_var": np.asarray(values).tolist(),
                 "eta": c.sample.x_var_eta, "num_images": len(images), "step": ckpt_step}, fh)
  return t_grid, values


class Samplers(NamedTuple):
  """The jitted sampling functions of a run, built once (repeated calls do not recompile).

  ``sample(params, z, labels, steps, x_var, table)``: ``x_var`` 'none' = DDIM steps, i.e.
  multistep consistency sampling (Alg. 2); 'analytic' or 'table' = aDDIM with x_var from
  ``addim.analytic_x_var`` or interpolated from ``table = (t grid, values)``.
  ``estimate_x_var(params, x, labels, rng) -> (t grid, values)`` (Alg. 3 on data).
  """
  sample: Callable
  estimate_x_var: Callable


def make_samplers(c, denoise, logsnr_fn):
  @functools.partial(jax.jit, static_argnums=(3, 4))
  def sample(params, z, labels, steps, x_var, table=None):
    x_var_fn = None  # 'none'
    if x_var == "analytic":
      x_var_fn = addim.analytic_x_var_fn
    elif x_var == "table":
      x_var_fn = addim.table_x_var(*table)
    return addim.sample(lambda zz, t: denoise(params, zz, t, labels), z, steps, logsnr_fn,
                        x_var_fn)

  @jax.jit
  def estimate_x_var(params, x, labels, rng):
    return addim.estimate_x_var_table(lambda z, t: denoise(params, z, t, labels), x, logsnr_fn,
                                      rng, c.sample.x_var_points, c.sample.x_var_eta)

  return Samplers(sample, estimate_x_var)


def _sampler_runs(c, params, samplers, source, workdir, ckpt_step, steps=()):
  """[(name, steps, x_var, table)]: the student at its step count(s), or the base model with
  aDDIM (x_var from the table measured on data, or the analytic rule)."""
  if c.objective == "base":
    table = (x_var_table(c, params, samplers, source, workdir, ckpt_step)
             if c.sample.x_var == "table" else None)
    return [(f"addim_{s}", s, c.sample.x_var, table) for s in (steps or c.sample.teacher_steps)]
  return [(f"{c.objective}_{s}", s, "none", None)
          for s in (steps or (c.consistency.student_steps,))]


def generate(c, samplers, params, num, run, mesh, seed_offset=99, batch_size=None):
  """``num`` samples [num, r, r, ch] in [-1, 1] (host numpy, on every process) of one
  ``_sampler_runs`` entry, balanced over classes; batches split over the mesh's devices."""
  _, steps, x_var, table = run
  batch_size = batch_size or num
  res, ch = c.data.resolution, c.data.channels
  key = jax.random.PRNGKey(c.seed + seed_offset)
  out = []
  for b, start in enumerate(range(0, num, batch_size)):
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, b), (batch_size, res, res, ch)))
    labels = (start + np.arange(batch_size)) % c.data.num_classes
    if batch_size % mesh.size == 0:  # host arrays, identical on every process
      z, labels = jax.device_put((z, labels), sharding.batch_sharding(mesh))
    x = samplers.sample(params, z, labels, steps, x_var, table)  # every process runs it
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(np.asarray(x))
  return np.concatenate(out)[:num]


def write_samples(c, params, samplers, workdir, step, source, mesh):
  """PNG grids: the student with its own steps (Alg. 2), or the base model with aDDIM."""
  paths = []
  for run in _sampler_runs(c, params, samplers, source, workdir, step):
    x = generate(c, samplers, params, c.sample.num, run, mesh)
    path = os.path.join(workdir, f"samples_{run[0]}_step{step}.png")
    if jax.process_index() == 0:
      plotting.image_grid(path, x)
    paths.append(path)
  return paths


def reference_statistics(c, source, feature_fn, workdir):
  """(mu, sigma) of the data's features: from ``c.eval.reference_stats`` if set, else computed
  from ``c.eval.reference_num`` images and cached in ``workdir/reference_<features>.npz``."""
  if c.eval.reference_stats:
    return fid.load_statistics(c.eval.reference_stats)
  path = os.path.join(workdir, f"reference_{c.eval.features}.npz")
  if os.path.isfile(path):
    return fid.load_statistics(path)
  n = min(c.eval.reference_num, len(source))
  subset = _subset_indices(source, n, c.seed, 54321)
  feats = []
  for start in range(0, n, c.eval.batch_size):  # one chunk in memory at a time
    images, _ = source.get(subset[start:start + c.eval.batch_size])
    feats.append(fid.batched_features(feature_fn, images, c.eval.batch_size)[0])
  mu, sigma = fid.statistics(np.concatenate(feats))
  if jax.process_index() == 0:
    fid.save_statistics(path, mu, sigma, n)
  logging.info("reference statistics of %d images -> %s", n, path)
  return mu, sigma


def evaluate(config, workdir):
  """``--mode=eval``: the latest EMA parameters in ``workdir``; for each step count,
  ``eval.num`` samples -> Frechet distance to the data statistics (+ class accuracy of the
  samples where the feature network is a classifier) and a PNG grid. Writes
  ``workdir/eval_step<step>.json``; returns its contents."""
  _validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  model, logsnr_fn, denoise = build(c)
  params, step = load_ema_params(workdir, abstract_params(model, c, mesh), what="--workdir")
  source = image_data.load(c.data.name, c.data.resolution, c.data.data_dir, c.data.split)
  feature_fn = fid.make_feature_fn(c.eval.features, c.eval.inception_weights)
  ref_mu, ref_sigma = reference_statistics(c, source, feature_fn, workdir)
  samplers = make_samplers(c, denoise, logsnr_fn)
  rows = []
  for run in _sampler_runs(c, params, samplers, source, workdir, step, tuple(c.eval.steps)):
    name, steps = run[:2]
    t0 = time.time()
    x = generate(c, samplers, params, c.eval.num, run, mesh, seed_offset=1000,
                 batch_size=c.eval.batch_size)
    seconds = time.time() - t0
    feats, logits = fid.batched_features(feature_fn, x, c.eval.batch_size)
    row = {"sampler": name, "steps": steps, "num": len(x), "sampling_seconds": round(seconds, 1),
           "fd": fid.frechet_distance(*fid.statistics(feats), ref_mu, ref_sigma)}
    if logits is not None:
      labels = np.arange(len(x)) % c.data.num_classes
      row["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
    logging.info("eval %s: %s", name, row)
    rows.append(row)
    if jax.process_index() == 0:
      plotting.image_grid(os.path.join(workdir, f"eval_{name}_step{step}.png"), x[:64])
  result = {"checkpoint_step": step, "features": c.eval.features,
            "reference": c.eval.reference_stats or f"reference_{c.eval.features}.npz",
            "results": rows}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_step{step}.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result
