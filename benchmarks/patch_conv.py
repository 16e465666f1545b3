"""SDXL's 3x3 convolutions at 256 px on this machine: XLA's convolution against ``patch_conv``'s
matrix product of patches (forward, and the gradient in input and kernel), with PyTorch's
``conv2d`` forward beside them. Prints one JSON line of milliseconds (median of ``--repeats``)
per shape: ``batch, size, c_in, c_out``.

  python benchmarks/patch_conv.py [--batch 1 2] [--repeats 7]
"""
import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.models import patch_conv
# benchmarks/mlcm.py's median-of-repeats timer (this script's folder is on sys.path)
from mlcm import timeit  # pylint: disable=g-bad-import-order

# (size, c_in, c_out) of SDXL's 3x3 convolutions at 32 x 32 latents: each level's resnets, and
# the up path's first convolutions on the concatenated skips.
SHAPES = ((32, 320, 320), (32, 640, 320), (16, 640, 640), (16, 1280, 640), (8, 1280, 1280),
          (8, 2560, 1280))
PAD = ((1, 1), (1, 1))


def median_ms(fn, repeats):
  return round(timeit(fn, repeats) * 1e3, 2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  xla = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  dot = jax.jit(lambda x, k: patch_conv.patches_dot(x, k, (1, 1), PAD))
  grad = lambda f: jax.jit(jax.grad(lambda x, k, g: jnp.vdot(f(x, k), g), argnums=(0, 1)))
  xla_grad, dot_grad = grad(xla), grad(dot)
  rng = np.random.default_rng(0)
  for batch in args.batch:
    for size, c_in, c_out in SHAPES:
      x = rng.standard_normal((batch, size, size, c_in), np.float32)
      k = (rng.standard_normal((3, 3, c_in, c_out)) / (9 * c_in) ** 0.5).astype(np.float32)
      g = rng.standard_normal((batch, size, size, c_out), np.float32)
      xj, kj, gj = (jax.device_put(a) for a in (x, k, g))
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
      kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
      with torch.no_grad():
        torch_ms = median_ms(lambda: torch.nn.functional.conv2d(xt, kt, padding=1),
                             args.repeats)
      print(json.dumps(dict(
          bench="patch_conv", machine=f"{platform.machine()} {os.cpu_count()} cores",
          backend=jax.default_backend(), batch=batch, size=size, c_in=c_in, c_out=c_out,
          pixels_over_channels=batch * size * size / c_out,
          xla_ms=median_ms(lambda: jax.block_until_ready(xla(xj, kj)), args.repeats),
          patches_dot_ms=median_ms(lambda: jax.block_until_ready(dot(xj, kj)), args.repeats),
          torch_ms=torch_ms, torch_threads=torch.get_num_threads(),
          xla_grad_ms=median_ms(lambda: jax.block_until_ready(xla_grad(xj, kj, gj)),
                                args.repeats),
          patches_dot_grad_ms=median_ms(lambda: jax.block_until_ready(dot_grad(xj, kj, gj)),
                                        args.repeats))), flush=True)


if __name__ == "__main__":
  main()
