"""Time to trace and compile a guided K-step SDXL sampler (``pipeline.make_generator``: the UNet
under classifier-free guidance, DDIM / DPM-Solver++(2M) jumps over a K-step grid, no VAE) and
the size of its program, for several K. Prints one JSON line per (sampler, K).

python benchmarks/sampler_compile.py [--unet tiny|DIR] [--steps 4,25] [--samplers ddim,dpmpp_2m]

'tiny' is the tests' tiny SDXL-architecture UNet (random weights, 8 x 8 latents); DIR a local
SDXL directory (its UNet at 128 x 128 latents; minutes per compile on CPU). Nothing runs the
sampler: the figures are jax.jit(...).lower (trace + lowering) and .compile.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from mcm_jax import pipeline
from mcm_jax.models import sdxl, sdxl_text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unet", default="tiny")
  parser.add_argument("--steps", default="4,25")
  parser.add_argument("--samplers", default="ddim,dpmpp_2m")
  args = parser.parse_args()
  if args.unet == "tiny":
    unet = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG)
    params, res = unet.init_weights(jax.random.PRNGKey(0)), 8
  else:
    unet, params = sdxl.load_unet(args.unet)
    res = unet.config["sample_size"]
  cond = {**sdxl_text.zeros_text_encoder(unet)([""]), "time_ids": sdxl.time_ids(res * 8, 1)}
  noise = jnp.zeros((1, res, res, 4))
  for sampler in args.samplers.split(","):
    for steps in (int(s) for s in args.steps.split(",")):
      generate = pipeline.make_generator(unet, None, steps, sampler=sampler)
      start = time.perf_counter()
      lowered = generate.lower(params, None, cond, noise, None, cond, 5.0)
      traced = time.perf_counter()
      lowered.compile()
      done = time.perf_counter()
      print(json.dumps({
          "unet": args.unet, "sampler": sampler, "steps": steps,
          "trace_lower_s": round(traced - start, 2), "compile_s": round(done - traced, 2),
          "hlo_chars": len(lowered.as_text()),
          "device": jax.devices()[0].device_kind, "host": platform.node(),
          "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
  main()
