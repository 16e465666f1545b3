"""Core overhead benchmark; prints one JSON line. Usage: python benchmarks/core.py [--quick]

(a) sampler_overhead = N-step aDDIM sample time / (N x one model call), target <= 1.02;
    sampler_overhead_vs_loop divides instead by N chained model calls in one jitted loop
    (same dispatch as the sampler, no sampler math): the cost of the aDDIM arithmetic alone.
(b) cd_step_ratio = CD train step / student forward+backward, ideal 5/3 (teacher fwd +
    student fwd + student fwd/bwd over fwd/bwd at 1 fwd : 2 bwd), target <= 1.1 x ideal.
Both ratios are measured in the same process, interleaved, median of repeats.
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs
from configs import toy  # pylint: disable=g-import-not-at-top
from mcm_jax import objectives, parameterization, schedules, train
from mcm_jax.models.mlp import MLPDenoiser
from mcm_jax.samplers import addim


def timeit(fn, *args, repeats=7):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
  args = parser.parse_args()
  hidden, batch, dim, n_steps = (128, 1024, 16, 8) if args.quick else (512, 4096, 64, 32)
  logsnr_fn = lambda t: schedules.cosine_logsnr(t)
  model = MLPDenoiser(hidden=hidden, depth=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, dim)), jnp.zeros((1,)))
  denoise = parameterization.make_denoiser(
      lambda p, z, logsnr, cond, rng: model.apply(p, z, logsnr), logsnr_fn, "v")
  z = jax.random.normal(jax.random.PRNGKey(1), (batch, dim))
  t = jnp.full((batch,), 0.5)

  model_call = jax.jit(lambda p, zz, tt: denoise(p, zz, tt))
  model_loop = jax.jit(lambda p, zz: jax.lax.fori_loop(
      0, n_steps, lambda i, a: denoise(p, a, jnp.full((batch,), 1.0 - i / n_steps)), zz))
  sampler = jax.jit(lambda p, zz: addim.sample(lambda a, b: denoise(p, a, b), zz, n_steps,
                                               logsnr_fn, addim.analytic_x_var_fn))
  # (b): student fwd+bwd vs a full CD train step (loss + grads + Adam + EMA).
  student_fwd_bwd = jax.jit(jax.grad(lambda p, zz, tt: jnp.mean(denoise(p, zz, tt) ** 2)))
  cd = objectives.consistency_loss(toy.get_config().consistency, denoise, logsnr_fn,
                                  student_steps=4, teacher_sampler="addim")
  tx = train.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=1, grad_clip=1.0, b1=0.9, b2=0.99, weight_decay=0.0)))
  state = train.init_state(params, tx, 0)
  step = jax.jit(train.make_train_step(cd, tx, 0.999))
  batch_data = {"x": z}

  model_times, loop_times, sampler_times, fb_times, cd_times = [], [], [], [], []
  for _ in range(3):  # interleave so machine noise hits both sides of each ratio
    model_times.append(timeit(model_call, params, z, t))
    loop_times.append(timeit(model_loop, params, z))
    sampler_times.append(timeit(sampler, params, z))
    fb_times.append(timeit(student_fwd_bwd, params, z, t))
    cd_times.append(timeit(lambda: step(state, batch_data, params)[1]["loss"]))
  model_t, sampler_t = np.median(model_times), np.median(sampler_times)
  fb_t, cd_t = np.median(fb_times), np.median(cd_times)
  print(json.dumps({
      "benchmark": "core", "quick": args.quick,
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "jax": jax.__version__,
                  "device": jax.devices()[0].device_kind},
      "model": {"mlp_hidden": hidden, "depth": 3, "batch": batch, "dim": dim},
      "sampler_steps": n_steps,
      "model_call_ms": round(model_t * 1e3, 3),
      "sampler_ms": round(sampler_t * 1e3, 3),
      "sampler_overhead": round(sampler_t / (n_steps * model_t), 4),
      "sampler_overhead_target": 1.02,
      "model_loop_ms": round(float(np.median(loop_times)) * 1e3, 3),
      "sampler_overhead_vs_loop": round(sampler_t / np.median(loop_times), 4),
      "student_fwd_bwd_ms": round(fb_t * 1e3, 3),
      "cd_step_ms": round(cd_t * 1e3, 3),
      "cd_step_ratio": round(cd_t / fb_t, 4),
      "cd_step_ratio_ideal": round(5 / 3, 4),
      "cd_step_ratio_target": round(1.1 * 5 / 3, 4),
  }))


if __name__ == "__main__":
  main()
