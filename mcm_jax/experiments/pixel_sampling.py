"""Sampling a pixel run: jitted samplers built once, the aDDIM x_var table measured on data,
class-balanced sample batches over the mesh, PNG grids. Used by training (grids) and
``--mode=eval`` (FID / FD per step count)."""
import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mcm_jax import guidance, plotting, seeds, sharding, storage
from mcm_jax.data import loader
from mcm_jax.samplers import addim, dpm_solver


class Samplers(NamedTuple):
  """The jitted sampling functions of a run, built once (repeated calls do not recompile).

  ``sample(params, z, labels, steps, method, table)``: ``method`` 'ddim' = DDIM steps, i.e.
  multistep consistency sampling (Alg. 2); 'analytic' or 'table' = aDDIM with x_var from
  ``addim.analytic_x_var`` or interpolated from ``table = (t grid, values)``; 'dpmpp_2m' =
  DPM-Solver++(2M) (``dpm_solver.dpmpp_2m_sample``).
  ``estimate_x_var(params, x, labels, rng) -> (t grid, values)`` (Alg. 3 on data).
  """
  sample: Callable
  estimate_x_var: Callable


def make_samplers(c, denoise, logsnr_fn):
  """``Samplers`` of a pixel config: ``sample`` guided by ``c.sample.guidance_scale`` (the null
  label ``c.data.num_classes`` as the unconditional input), ``estimate_x_var`` on the
  conditional prediction (the posterior's spread, which guidance does not change; MCM App. A
  computes CD's x_var from the conditional teacher for the same reason)."""
  null = jnp.full((1,), c.data.num_classes, jnp.int32)

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def sample(params, z, labels, steps, method, table=None):
    guided = lambda zz, t: guidance.guided(lambda z_, t_, y: denoise(params, z_, t_, y), zz, t,
                                           labels, null, c.sample.guidance_scale)[0]
    if method == "dpmpp_2m":
      return dpm_solver.dpmpp_2m_sample(guided, z, steps, logsnr_fn)
    x_var_fn = None  # 'ddim'
    if method == "analytic":
      x_var_fn = addim.analytic_x_var_fn
    elif method == "table":
      x_var_fn = addim.table_x_var(*table)
    return addim.sample(guided, z, steps, logsnr_fn, x_var_fn)

  @jax.jit
  def estimate_x_var(params, x, labels, rng):
    return addim.estimate_x_var_table(lambda z, t: denoise(params, z, t, labels), x, logsnr_fn,
                                      rng, c.sample.x_var_points, c.sample.x_var_eta)

  return Samplers(sample, estimate_x_var)


def x_var_table(c, params, samplers, source, workdir, ckpt_step, mesh):
  """(t grid, x_var) of aDDIM, measured on ``c.sample.x_var_data`` data images (MCM Alg. 3) for
  the parameters of checkpoint ``ckpt_step``; written to ``workdir/x_var_table.json`` as
  {"t": [...], "x_var": [...], "step": ...} and reused from there for the same step. The images
  are split over the mesh's devices (each computes its share, not all of it)."""
  path = os.path.join(workdir, "x_var_table.json")
  if storage.isfile(path):
    table = storage.read_json(path)
    if (table.get("step") == ckpt_step and len(table["t"]) == c.sample.x_var_points
        and table["eta"] == c.sample.x_var_eta):
      return jnp.asarray(table["t"]), jnp.asarray(table["x_var"])
  n = min(c.sample.x_var_data, len(source))
  data = loader.read(source, loader.subset_indices(len(source), n,
                                                  seeds.entropy(c.seed, "x_var_data")))
  images, labels = data["x"], data["label"]
  if n % mesh.size == 0:  # host arrays, identical on every process
    images, labels = sharding.put((images, labels), sharding.batch_sharding(mesh))
  t_grid, values = samplers.estimate_x_var(params, images, labels,
                                           seeds.key(c.seed, "x_var_noise"))
  if jax.process_index() == 0:
    storage.write_json(path, {"t": np.asarray(t_grid).tolist(),
                              "x_var": np.asarray(values).tolist(), "eta": c.sample.x_var_eta,
                              "num_images": len(images), "step": ckpt_step}, indent=None)
  return t_grid, values


def sampler_runs(c, params, samplers, source, workdir, ckpt_step, mesh, steps=()):
  """[(name, steps, method, table)] (``Samplers.sample``'s arguments): the student at its step
  count(s) with DDIM steps, or the base model with ``sample.sampler``: aDDIM (x_var from the
  table measured on data, or the analytic rule) or DPM-Solver++(2M); the name ends in
  ``_w<scale>`` when sampling is guided."""
  if c.objective == "base":
    steps = steps or c.sample.teacher_steps
    w = f"_w{c.sample.guidance_scale:g}" if c.sample.guidance_scale != 1 else ""
    if c.sample.sampler == "dpmpp_2m":
      return [(f"dpmpp_2m_{s}{w}", s, "dpmpp_2m", None) for s in steps]
    table = (x_var_table(c, params, samplers, source, workdir, ckpt_step, mesh)
             if c.sample.x_var == "table" else None)
    return [(f"addim_{s}{w}", s, c.sample.x_var, table) for s in steps]
  return [(f"{c.objective}_{s}", s, "ddim", None)
          for s in (steps or (c.consistency.student_steps,))]


def generate(c, samplers, params, num, run, mesh, stream="sample_grid", batch_size=None):
  """``num`` samples [num, r, r, ch] in [-1, 1] (host numpy, on every process) of one
  ``sampler_runs`` entry, balanced over classes; batches split over the mesh's devices."""
  _, steps, method, table = run
  batch_size = batch_size or num
  res, ch = c.data.resolution, c.data.channels
  key = seeds.key(c.seed, stream)
  out = []
  for b, start in enumerate(range(0, num, batch_size)):
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, b), (batch_size, res, res, ch)))
    labels = (start + np.arange(batch_size)) % c.data.num_classes
    if batch_size % mesh.size == 0:  # host arrays, identical on every process
      z, labels = sharding.put((z, labels), (sharding.batch_sharding(mesh),) * 2)
    x = samplers.sample(params, z, labels, steps, method, table)  # every process runs it
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(np.asarray(x))
  return np.concatenate(out)[:num]


def write_samples(c, params, samplers, workdir, step, source, mesh):
  """PNG grids: the student with its own steps (Alg. 2), or the base model with aDDIM."""
  paths = []
  for run in sampler_runs(c, params, samplers, source, workdir, step, mesh):
    x = generate(c, samplers, params, c.sample.num, run, mesh)
    path = os.path.join(workdir, f"samples_{run[0]}_step{step}.png")
    if jax.process_index() == 0:
      plotting.image_grid(path, x)
    paths.append(path)
  return paths
