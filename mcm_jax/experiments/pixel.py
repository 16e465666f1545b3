"""Pixel-space MCM: UViT base diffusion, then multistep CT / CD from the base checkpoint
(SPEC sections 4-5, MCM App. A), on the sharded training loop. Configs: ``configs/imagenet*.py``
(size 'tiny' = the same path on scikit-learn's digits at 16x16).

``run`` trains and writes sample grids; ``evaluate`` (``--mode=eval``) measures FID (FD-digits
for 'tiny') of N samples at each step count against reference statistics of the data.
"""
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import checkpoint, fid, objectives, plotting, sharding, storage, train
from mcm_jax.config_validation import validate
from mcm_jax.errors import ConfigError
from mcm_jax.data import images as image_data
from mcm_jax.data import loader
from mcm_jax.experiments import Step, pixel_sampling
from mcm_jax.metric_writer import create_writer


def segmented(c):
  """Whether the config's model is a student that sees its segment position."""
  return c.objective != "base" and c.model.segment_input


def build(c, mesh):
  """(model, logsnr_fn, denoise, abstract params sharded over ``mesh``) of a pixel config: the
  trained network (a CT / CD student with its segment embedding when ``model.segment_input``)."""
  student_steps = c.consistency.student_steps if c.objective != "base" else None
  model, logsnr_fn, denoise = objectives.uvit_model(c, student_steps)
  like = sharding.abstract_params(objectives.uvit_init(model, segmented(c)),
                                  objectives.uvit_inputs(c), mesh, c.seed)
  return model, logsnr_fn, denoise, like


def base_params(params):
  """The base model's part of (student) parameters: all but the segment embedding."""
  return {**params, "params": {k: v for k, v in params["params"].items()
                               if k != "segment_embed"}}


def frozen_params(c, params):
  """The train step's ``frozen`` tree: for CD the base run's EMA parameters (the teacher: the
  student's initial parameters but its segment embedding), for CT and base diffusion None
  (CT's loss reads no teacher; passing one would hold a parameter copy in every chip's memory
  for nothing)."""
  return base_params(params) if c.objective == "cd" else None


def check_teacher_trained_unconditional(c):
  """ConfigError when CD is guided (``consistency.guidance_scale != 1``) by a base run whose
  ``config.json`` shows no label dropout (``p_uncond`` 0 or absent): its null label was never
  trained. A base run without ``config.json`` is trusted, with a warning."""
  path = os.path.join(c.init_from, "config.json")
  if not storage.isfile(path):
    logging.warning("%s is missing: cannot check that the teacher trained its null label "
                    "(p_uncond > 0), which consistency.guidance_scale=%s relies on", path,
                    c.consistency.guidance_scale)
    return
  p_uncond = storage.read_json(path).get("p_uncond", 0.0)
  if not p_uncond:
    raise ConfigError(
        f"config.consistency.guidance_scale={c.consistency.guidance_scale!r} is invalid for the "
        f"teacher in config.init_from={c.init_from!r}: it was trained with p_uncond="
        f"{p_uncond!r} ({path}), so its unconditional branch is untrained; allowed: "
        "guidance_scale=1, or a base run trained with p_uncond > 0")


def batch_shapes(c):
  """ShapeDtypeStructs of one global batch (``loader.host_batch_fn``): 'x' float32
  [B, r, r, C] in [-1, 1], 'label' int32 [B]."""
  b, r, ch = c.train.batch_size, c.data.resolution, c.data.channels
  return {"x": jax.ShapeDtypeStruct((b, r, r, ch), jnp.float32),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32)}


REMAT_FIELD = "model.remat"


def num_stages(c):
  """Pixel configs train one step (base, CT or CD)."""
  del c
  return 1


def step(c, denoise, logsnr_fn, params):
  """The train step of ``run``: ``objectives.pixel_loss`` on ``params`` (the UViT's), with CD's
  teacher as the frozen input; ``forward`` denoises the batch at t = 0.5."""
  forward = lambda p, frozen, b: denoise(p, b["x"], jnp.full(b["x"].shape[:1], 0.5), b["label"])
  teacher = objectives.uvit_model(c)[2] if segmented(c) else None  # the base model's network
  return Step(loss=objectives.pixel_loss(c, denoise, logsnr_fn, teacher), params=params,
              frozen=frozen_params(c, params), batch=batch_shapes(c), model_params=params,
              forward=forward)


def data_source(c):
  """The image source of ``config.data`` (``images.load``)."""
  return image_data.load(c.data.name, c.data.resolution, c.data.data_dir, c.data.split,
                         c.data.jpeg_draft)


def abstract_step(c, stage=0):
  """``step`` on the parameters' shapes (no mesh): what ``--mode=plan`` compiles."""
  del stage
  _, logsnr_fn, denoise, like = build(c, None)
  return step(c, denoise, logsnr_fn, like)


def run(config, workdir):
  """Trains (base / CT / CD) and writes sample grids; returns {'samples': [PNG paths]}."""
  validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  source = data_source(c)
  model, logsnr_fn, denoise, like = build(c, mesh)
  if c.objective == "base":
    inputs = [jnp.zeros(x.shape, x.dtype) for x in objectives.uvit_inputs(c)]
    params = jax.jit(model.init)(jax.random.PRNGKey(c.seed), *inputs)  # one compile, not many
  else:  # CT / CD start from the base run's EMA parameters, which CD also uses as its teacher
    if c.objective == "cd" and c.consistency.guidance_scale != 1:
      check_teacher_trained_unconditional(c)
    params = checkpoint.load_ema_params(c.init_from, base_params(like))[0]
    if segmented(c):  # and the segment embedding, zero as initialised: the student starts as
      # the base model
      zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding),
                                     like["params"]["segment_embed"])
      params = {**params, "params": {**params["params"], "segment_embed": zeros}}
  writer = create_writer(workdir)
  batch_fn = loader.host_batch_fn(source, c.train.batch_size, c.seed, **c.data.reading)
  data_spec = dict(dataset=c.data.name, split=c.data.split, resolution=c.data.resolution,
                   num_examples=len(source), global_batch=c.train.batch_size, seed=c.seed)
  if c.data.jpeg_draft:  # named only when set, so earlier runs' checkpoints still match
    data_spec["jpeg_draft"] = True
  samplers = pixel_sampling.make_samplers(c, denoise, logsnr_fn)
  grids = lambda step, st: pixel_sampling.write_samples(c, st.ema_params, samplers, workdir,
                                                        step, source, mesh)
  trained = step(c, denoise, logsnr_fn, params)
  try:
    state = train.train(trained.loss, trained.params, None, c.train, workdir,
                        frozen=trained.frozen, writer=writer,
                        name=c.objective, mesh=mesh, host_batch_fn=batch_fn, data_spec=data_spec,
                        periodic=[(c.sample.every, grids)] if c.sample.every else [])
  finally:
    batch_fn.close()
  paths = grids(int(state.step), state)
  writer.close()
  if jax.process_index() == 0:
    storage.write_json(os.path.join(workdir, "samples.json"),
                       {"step": int(state.step), "samples": paths})
  return {"samples": paths}


def evaluate(config, workdir):
  """``--mode=eval``: the latest EMA parameters in ``workdir``; for each step count,
  ``eval.num`` samples -> Frechet distance to the data statistics (+ class accuracy of the
  samples where the feature network is a classifier) and a PNG grid. Writes
  ``workdir/eval_step<step>.json``; returns its contents."""
  validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  _, logsnr_fn, denoise, like = build(c, mesh)
  params, step = checkpoint.load_ema_params(workdir, like, what="--workdir")
  source = data_source(c)
  feature_fn = fid.make_feature_fn(c.eval.features, c.eval.inception_weights)
  if c.eval.reference_stats:
    ref_mu, ref_sigma = fid.load_statistics(c.eval.reference_stats)
  else:
    ref_mu, ref_sigma = fid.reference_statistics(
        source, feature_fn, os.path.join(workdir, f"reference_{c.eval.features}.npz"),
        c.eval.reference_num, c.eval.batch_size, c.seed)
  samplers = pixel_sampling.make_samplers(c, denoise, logsnr_fn)
  rows = []
  for run_ in pixel_sampling.sampler_runs(c, params, samplers, source, workdir, step, mesh,
                                          tuple(c.eval.steps)):
    name, steps = run_[:2]
    t0 = time.time()
    x = pixel_sampling.generate(c, samplers, params, c.eval.num, run_, mesh, stream="eval_noise",
                                batch_size=c.eval.batch_size)
    seconds = time.time() - t0
    feats, logits = fid.batched_features(feature_fn, x, c.eval.batch_size)
    row = {"sampler": name, "steps": steps, "num": len(x), "sampling_seconds": round(seconds, 1),
           "guidance_scale": c.sample.guidance_scale if c.objective == "base" else 1.0,
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
    storage.write_json(os.path.join(workdir, f"eval_step{step}.json"), result)
  return result
