"""The toy experiment (embedded CPU default): teacher -> CT / CD students -> table and figures.

Every training run has its own checkpoint directory under ``workdir``; re-running the same
command resumes where it stopped (finished runs are restored, not retrained).
"""
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import objectives, plotting, seeds, storage, train
from mcm_jax.config_validation import validate
from mcm_jax.data import toy as toy_data
from mcm_jax.evaluation import energy_distance
from mcm_jax.metric_writer import create_writer
from mcm_jax.samplers import addim


def _data_spec(config, cfg):
  """The data stream, stored with checkpoints: batches are drawn on device from (seed, step)."""
  return dict(dataset=config.data.name, global_batch=cfg.batch_size, seed=cfg.seed)


def _train(config, cfg, loss, params, sampler, workdir, writer, name, frozen=None, steps=None):
  cfg = cfg.copy_and_resolve_references()
  cfg.steps = steps or cfg.steps
  batch_fn = lambda rng: {"x": sampler(rng, cfg.batch_size)}
  state = train.train(loss, params, batch_fn, cfg, os.path.join(workdir, name), frozen=frozen,
                      writer=writer, name=name, data_spec=_data_spec(config, cfg))
  return state.ema_params


def train_teacher(config, sampler, dim, workdir, writer, steps=None, name="teacher"):
  model, logsnr_fn, denoise = objectives.toy_model(config)
  params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, dim)), jnp.zeros((1,)))
  return _train(config, config.teacher, objectives.diffusion_loss(denoise, logsnr_fn), params,
                sampler, workdir, writer, name, steps=steps)


def student_init(config, teacher_params, student_steps):
  """The student's initial parameters: the teacher's, plus the zero-initialised segment
  embedding when ``config.model.segment_input`` (so the student starts as the teacher)."""
  if not config.model.get("segment_input", False):
    return teacher_params
  model, _, _ = objectives.toy_model(config, student_steps)
  # The embedding's shapes do not depend on the data's dimension: init on a 1-D stand-in.
  extra = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 1)), jnp.zeros((1,)),
                     segment=jnp.ones((1,)))["params"]["segment_embed"]
  return {**teacher_params, "params": {**teacher_params["params"], "segment_embed": extra}}


def student_run_name(method, student_steps, seed_index=0):
  """A student's run (and checkpoint directory) name; seed 0 keeps the single-seed name."""
  return f"{method}_{student_steps}" + (f"_seed{seed_index}" if seed_index else "")


def train_student(config, sampler, teacher_params, method, student_steps, workdir, writer,
                  steps=None, seed_index=0, prefix=""):
  """Initialises from the teacher and trains a CT / CD student (MCM Alg. 1) with training seed
  ``config.student.seed + seed_index``; its run is ``prefix + student_run_name(...)``."""
  _, logsnr_fn, student = objectives.toy_model(config, student_steps)
  _, _, teacher = objectives.toy_model(config)
  loss = objectives.toy_loss(config, student, logsnr_fn, method, student_steps, teacher)
  cfg = config.student.copy_and_resolve_references()
  cfg.seed += seed_index
  return _train(config, cfg, loss, student_init(config, teacher_params, student_steps),
                sampler, workdir, writer,
                prefix + student_run_name(method, student_steps, seed_index),
                frozen=teacher_params, steps=steps)


def make_sampler_fn(config, x_var_table=None, student_steps=None):
  """A jitted ``(params, z, num_steps) -> x``: DDIM, or aDDIM with x_var interpolated from
  ``x_var_table = (t_grid, x_var)``, of the teacher or (``student_steps``) of that student's
  model. ``num_steps`` is traced: one compile for all step counts."""
  _, logsnr_fn, denoise = objectives.toy_model(config, student_steps)

  @jax.jit
  def run(params, z, num_steps, table):
    x_var_fn = None if table is None else addim.table_x_var(*table)
    return addim.sample(lambda zz, t: denoise(params, zz, t), z, num_steps, logsnr_fn, x_var_fn)

  return lambda params, z, num_steps: run(params, z, num_steps, x_var_table)


def x_var_table(config, params, sampler):
  _, logsnr_fn, denoise = objectives.toy_model(config)
  data = sampler(seeds.key(config.eval.seed, "x_var_data"), 8192)
  f = lambda z, t: denoise(params, z, t)
  return jax.jit(addim.estimate_x_var_table, static_argnums=(0, 2, 4))(
      f, data, logsnr_fn, seeds.key(config.eval.seed, "x_var_noise"),
      config.eval.x_var_table_points, config.eval.x_var_eta)


def run_2d(config, workdir, writer, data_source=None):
  """Teacher, students and the results table on the 2-D dataset (or ``data_source``, any
  [N, D] data accepted by ``toy_data.as_sampler``; figures then show its first two dims)."""
  sampler = toy_data.as_sampler(config.data.name if data_source is None else data_source)
  dim = sampler(jax.random.PRNGKey(0), 1).shape[1]
  ev = config.eval
  noise = jax.random.normal(seeds.key(ev.seed, "eval_noise"), (ev.num_samples, dim))
  ref = sampler(seeds.key(ev.seed, "eval_reference"), ev.num_samples)
  fresh = sampler(seeds.key(ev.seed, "eval_fresh_data"), ev.num_samples)
  results = {"data_vs_fresh_data": float(energy_distance(fresh, ref))}
  samples = {}

  teacher = train_teacher(config, sampler, dim, workdir, writer)
  table = x_var_table(config, teacher, sampler)
  ddim = make_sampler_fn(config)
  addim_fn = make_sampler_fn(config, table)
  n_teacher = ev.teacher_sampling_steps
  samples["teacher"] = {}
  for name, fn in (("aDDIM", addim_fn), ("DDIM", ddim)):
    x = fn(teacher, noise, n_teacher)
    results[f"teacher_{name.lower()}_{n_teacher}"] = float(energy_distance(x, ref))
    samples["teacher"][f"{name} {n_teacher}"] = x

  steps = tuple(config.sweep.student_steps)
  for s in steps:
    results[f"teacher_ddim_{s}"] = float(energy_distance(ddim(teacher, noise, s), ref))
  for method in config.sweep.methods:
    samples[method] = {}
    for s in steps:
      per_seed = []
      for i in range(config.sweep.num_seeds):
        t0 = time.time()
        student = train_student(config, sampler, teacher, method, s, workdir, writer,
                                seed_index=i)
        # MCM Alg. 2: DDIM over the student's own steps.
        x = make_sampler_fn(config, student_steps=s)(student, noise, s)
        per_seed.append(float(energy_distance(x, ref)))
        if i == 0:
          samples[method][f"{s}-step"] = x
        logging.info("%s %d-step seed %d: energy distance %.3g (%.0fs)", method, s, i,
                     per_seed[-1], time.time() - t0)
      results[f"{method}_{s}"] = float(np.mean(per_seed))
      if len(per_seed) > 1:
        results[f"{method}_{s}_seeds"] = per_seed
  if dim >= 2:
    # A dict comprehension, not tree_map: tree_map sorts the keys ('16-step' before '2-step').
    first2 = {row: {col: x[:, :2] for col, x in panels.items()} for row, panels in samples.items()}
    plotting.scatter_grid(os.path.join(workdir, "samples.png"), first2,
                          reference=ref[:, :2])
  return results


FIG1_RUNS = "mixture1d/"  # run-name prefix (and checkpoint folder) of the Fig. 1 runs


def run_fig1(config, workdir, writer):
  """MCM Fig. 1 on the 1-D two-Gaussian mixture: 1/2/4-step CD students and the teacher, as runs
  ``mixture1d/teacher``, ``mixture1d/cd_addim_<s>`` (their own metric keys and checkpoints)."""
  sampler = toy_data.get_sampler("mixture1d")
  fc, ev = config.fig1, config.eval
  teacher = train_teacher(config, sampler, 1, workdir, writer, steps=fc.teacher_steps,
                          name=FIG1_RUNS + "teacher")
  _, logsnr_fn, denoise = objectives.toy_model(config)
  z = jnp.linspace(-2.5, 2.5, 96)[:, None]
  noise = jax.random.normal(seeds.key(ev.seed, "eval_noise"), (ev.num_samples, 1))
  ref = sampler(seeds.key(ev.seed, "eval_reference"), ev.num_samples)
  ddim = make_sampler_fn(config)
  results, panels = {}, []
  for s in fc.student_steps:
    student = train_student(config, sampler, teacher, "cd_addim", s, workdir, writer,
                            steps=fc.student_train_steps, prefix=FIG1_RUNS)
    results[f"cd_addim_{s}"] = float(energy_distance(
        make_sampler_fn(config, student_steps=s)(student, noise, s), ref))
    student_denoise = objectives.toy_model(config, s)[2]
    f = jax.jit(lambda zz, t, p=student, g=student_denoise: g(p, zz, t))
    panels.append((f"{s}-step CD", *plotting.dense_trajectories(f, z, s, logsnr_fn, 24)))
  f = jax.jit(lambda zz, t: denoise(teacher, zz, t))
  panels.append(("teacher, DDIM 128 steps", *plotting.dense_trajectories(f, z, 128, logsnr_fn, 1)))
  results["teacher_ddim_128"] = float(energy_distance(ddim(teacher, noise, 128), ref))
  plotting.trajectory_panels(os.path.join(workdir, "fig1_trajectories.png"),
                             panels, data=ref[:, 0])
  return results


def _cell(results, key):
  """``mean`` (x 1e3), or ``mean ± half range (min-max)`` over the seeds' values."""
  seeds = results.get(f"{key}_seeds")
  if not seeds:
    return f"{results.get(key, float('nan')) * 1e3:.2f}"
  lo, hi = min(seeds) * 1e3, max(seeds) * 1e3
  return f"{np.mean(seeds) * 1e3:.2f} ± {(hi - lo) / 2:.2f}"


def format_table(results, config):
  """Markdown table: rows = student steps, columns = teacher DDIM / CT / CD (aDDIM) / CD (DDIM)."""
  cols = [("teacher DDIM", "teacher_ddim")] + [
      ({"ct": "CT", "cd_addim": "CD (aDDIM teacher)", "cd_ddim": "CD (DDIM teacher)"}[m], m)
      for m in config.sweep.methods]
  lines = ["| student steps | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for s in config.sweep.student_steps:
    row = [_cell(results, f"{key}_{s}") for _, key in cols]
    lines.append(f"| {s} | " + " | ".join(row) + " |")
  n = config.eval.teacher_sampling_steps
  lines.append(f"\nteacher aDDIM {n} steps: {results[f'teacher_addim_{n}'] * 1e3:.2f}; "
               f"teacher DDIM {n} steps: {results[f'teacher_ddim_{n}'] * 1e3:.2f}; "
               f"data vs fresh data: {results['data_vs_fresh_data'] * 1e3:.2f} "
               "(energy distance x 1e3, lower is better)")
  return "\n".join(lines)


def run(config, workdir, data_source=None):
  """Runs the whole toy experiment; writes results.json, results.md and PNGs to workdir.

  ``data_source`` (Python callers) replaces ``config.data.name``: a sampler ``(rng, n) ->
  [n, D]``, an [N, D] array or an iterable of [n, D] arrays; results are keyed 'custom'.
  """
  validate(config)
  storage.makedirs(workdir)
  writer = create_writer(workdir)
  t0 = time.time()
  name = config.data.name if data_source is None else "custom"
  results = {name: run_2d(config, workdir, writer, data_source)}
  if config.fig1.enabled:
    results["mixture1d"] = run_fig1(config, workdir, writer)
  results["wall_time_s"] = time.time() - t0
  storage.write_json(os.path.join(workdir, "results.json"), results)
  table = format_table(results[name], config)
  storage.write_text(os.path.join(workdir, "results.md"),
                     f"Energy distance to {name} data (x 1e3)\n\n{table}\n")
  print(f"results ({name}, energy distance x 1e3, lower is better):\n{table}")
  writer.close()
  return results
