"""UViT training throughput; prints one JSON line per size.

python benchmarks/pixel.py [--sizes tiny,small] [--batch 2] [--resolution 64] [--parts base,cd]

For each size: base diffusion train step (fwd + bwd + Adam + EMA) images/s; CD train step /
student fwd+bwd (ideal 5/3); FLOPs per step from XLA's cost analysis, divided by the step time and
by a float32 matmul peak measured in the same run (utilisation). Model and losses are built from
``configs/imagenet64_{base,cd}.py`` at the given size, resolution and dtype (dropout active, as
in training).
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs
from configs import imagenet64_base, imagenet64_cd  # pylint: disable=g-import-not-at-top
from mcm_jax import cli, objectives, train
from mcm_jax.experiments import pixel  # pylint: disable=g-import-not-at-top


def timeit(fn, repeats=3):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(n=2048):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / timeit(lambda: f(a), repeats=5)


def flops(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def bench(size, resolution, batch, dtype, parts):
  """The steps training runs (``pixel.step`` of the configs), on real parameters."""
  configs = {}
  for objective in ("base", "cd"):
    c = (imagenet64_base if objective == "base" else imagenet64_cd).get_config(size)
    c.model.update(resolution=resolution, dtype=jnp.dtype(dtype).name, remat="none" if size == "tiny" else "full")
    c.data.update(resolution=resolution, channels=3, num_classes=1000)
    c.schedule.update(image_res=resolution, noise_res_low=32, noise_res_high=resolution)
    configs[objective] = c
  model, logsnr_fn, denoise = objectives.uvit_model(configs["cd"])
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, resolution, resolution, 3))
  labels = jnp.arange(batch) % 1000
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x[:1], jnp.zeros((1,)), labels[:1])
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  tx = train.make_optimizer(configs["cd"].train.optim)
  state = train.init_state(params, tx, 0)
  batch_data = {"x": x, "label": labels}
  base, cd = (pixel.step(configs[o], denoise, logsnr_fn, params) for o in ("base", "cd"))
  out = {"size": size, "resolution": resolution, "batch": batch,
         "dtype": jnp.dtype(dtype).name, "params_M": round(n_params / 1e6, 1)}
  if "base" in parts:
    base_step = jax.jit(train.make_train_step(base.loss, tx, 0.9999))
    base_t = timeit(lambda: base_step(state, batch_data, base.frozen)[1]["loss"])
    base_flops = flops(base_step, state, batch_data, base.frozen)
    del base_step
    peak = matmul_peak()
    out.update(base_step_s=round(base_t, 4), images_per_s=round(batch / base_t, 2),
               base_step_gflop=round(base_flops / 1e9, 2),
               achieved_gflops=round(base_flops / base_t / 1e9, 1),
               matmul_peak_gflops=round(peak / 1e9, 1),
               utilisation=round(base_flops / base_t / peak, 3))
  if "cd" in parts:  # CD step and student fwd+bwd, interleaved in this process
    cd_step = jax.jit(train.make_train_step(cd.loss, tx, 0.9999))
    fwd_bwd = jax.jit(jax.grad(lambda p: jnp.mean(cd.forward(p, cd.frozen, batch_data) ** 2)))
    cd_t = timeit(lambda: cd_step(state, batch_data, cd.frozen)[1]["loss"])
    fb_t = timeit(lambda: fwd_bwd(params))
    out.update(cd_step_s=round(cd_t, 4), fwd_bwd_s=round(fb_t, 4),
               cd_step_ratio=round(cd_t / fb_t, 3), cd_step_ratio_ideal=round(5 / 3, 3))
  return out

def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="tiny,small",
                      type=cli.comma_list(("tiny", "small", "large")))
  parser.add_argument("--resolution", type=int, default=64, choices=(64, 128))
  parser.add_argument("--batch", type=cli.positive_int, default=2)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--parts", default="base,cd", type=cli.comma_list(("base", "cd")),
                      help="what to time; run 'base' and 'cd' in separate processes when memory "
                           "is short (UViT-small on a 24 GB CPU machine)")
  args = parser.parse_args()
  machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
             "device": jax.devices()[0].device_kind, "devices": jax.device_count()}
  for size in args.sizes:
    batch = args.batch * (16 if size == "tiny" else 1)
    print(json.dumps({"benchmark": "pixel", "machine": machine,
                      **bench(size, args.resolution, batch, jnp.dtype(args.dtype),
                                args.parts)}), flush=True)


if __name__ == "__main__":
  main()
