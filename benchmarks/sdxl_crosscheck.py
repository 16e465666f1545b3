"""JAX against diffusers / PyTorch on a full-size SDXL directory: one JSON line of figures.

  python benchmarks/sdxl_crosscheck.py DIR [--latent=32] [--rank=64] [--repeats=3]
      [--precisions=float32,bfloat16,float32:bfloat16] [--torch_bfloat16]

On the same weights (DIR: a real SDXL, or ``benchmarks/make_random_sdxl.py``'s) and inputs
(batch 1, ``latent`` x ``latent`` latents = 8x that in pixels, 77 text tokens):
- UNet eps, JAX float32 vs PyTorch float32 (relative L2), and JAX bfloat16 (weights and
  compute, the training setting) vs PyTorch float32; ``compute:weights`` precisions name the two
  apart (``float32:bfloat16``: frozen weights held in bfloat16, activations in float32,
  ``--config.dtype=float32 --config.unet.frozen_dtype=bfloat16`` in training);
- a random rank-``rank`` LoRA on the attention projections, exported by ``mcm_jax.lora.save``
  and loaded by diffusers' SDXL ``load_lora_into_unet`` (every module wrapped, counted): the
  LoRA's effect ``eps(with) - eps(without)`` in JAX float32 and bfloat16 vs PyTorch float32,
  with its gain (1: kept at full size) and the residual around it (``effect_figures``);
- with ``--torch_bfloat16``, the same two errors of diffusers' own bfloat16 UNet (weights,
  inputs and compute; the LoRA as peft keeps it), the error bfloat16 costs in PyTorch;
- one UNet forward's time (median of ``repeats``, after a warm-up / compile), JAX and PyTorch
  on the same threads, and each phase's peak RSS.
The models are loaded one after the other (PyTorch float32, then PyTorch bfloat16 if asked, then
each JAX precision), each freed before the next, so the peak stays near one float32 UNet.
"""
import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# benchmarks/mlcm.py's median-of-repeats timer (this script's folder is on sys.path)
from mlcm import timeit as median_time  # pylint: disable=wrong-import-position


def rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def rel_l2(got, want):
  return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def effect_figures(got, want, name):
  """The LoRA's effect ``got`` against the reference's ``want``: its relative L2 error, split
  into the gain ``g = <got, want> / <want, want>`` (1: the effect is kept at full size; a
  LoRA merged into low-precision weights and partly rounded away gives g < 1) and the residual
  ``|got - g want| / |want|`` (what is left: noise uncorrelated with the effect). The error's
  square is the sum of the two parts': ``(g - 1)^2 + residual^2``."""
  got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
  gain = float(got @ want / (want @ want))
  return {f"lora_delta_{name}_rel_l2": rel_l2(got, want), f"lora_gain_{name}": gain,
          f"lora_residual_{name}_rel_l2": float(np.linalg.norm(got - gain * want)
                                                / np.linalg.norm(want))}


def inputs(latent, seed=0):
  rng = np.random.default_rng(seed)
  return dict(z=rng.standard_normal((1, latent, latent, 4), np.float32),
              t=np.array([621], np.int64),
              cond=dict(context=rng.standard_normal((1, 77, 2048), np.float32),
                        text_embeds=rng.standard_normal((1, 1280), np.float32),
                        time_ids=np.array([[latent * 8] * 2 + [0, 0] + [latent * 8] * 2],
                                          np.float32)))


def torch_eps(directory, x, lora_dir, dtype, repeats):
  """diffusers' UNet in ``dtype`` (weights and compute) on ``x``: (eps, eps with the LoRA
  loaded by ``load_lora_into_unet``, median forward seconds, modules wrapped, LoRA dtypes)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  dtype = getattr(torch, dtype)
  variant = "fp16" if os.path.isfile(os.path.join(
      directory, "unet", "diffusion_pytorch_model.fp16.safetensors")) else None
  unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", variant=variant,
                                              torch_dtype=dtype).eval()
  cond = x["cond"]
  tensor = lambda a: torch.from_numpy(a).to(dtype)
  args = (tensor(x["z"]).permute(0, 3, 1, 2), torch.from_numpy(x["t"]), tensor(cond["context"]))
  added = {"text_embeds": tensor(cond["text_embeds"]), "time_ids": tensor(cond["time_ids"])}

  def eps():
    with torch.no_grad():
      return unet(*args, added_cond_kwargs=added).sample.permute(0, 2, 3, 1).float().numpy()

  base = eps()
  seconds = median_time(eps, repeats)
  state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(lora_dir)
  StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet)
  lora_modules = [m for m in unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
  lora_dtypes = sorted({str(p.dtype) for m in lora_modules for p in m.lora_A.parameters()})
  with_lora = eps()
  del unet
  gc.collect()
  return base, with_lora, seconds, len(lora_modules), lora_dtypes


def torch_figures(directory, x, lora_dir, repeats, bfloat16):
  """PyTorch float32 (the reference: eps, eps with the LoRA, figures) and, with ``bfloat16``,
  PyTorch's own bfloat16 errors against it (eps and the LoRA's effect)."""
  import torch  # pylint: disable=g-import-not-at-top
  base, with_lora, seconds, wrapped, _ = torch_eps(directory, x, lora_dir, "float32", repeats)
  figures = dict(torch_forward_s=seconds, torch_lora_modules=wrapped,
                 torch_threads=torch.get_num_threads())
  if bfloat16:
    got, got_lora, seconds, _, lora_dtypes = torch_eps(directory, x, lora_dir, "bfloat16", 1)
    figures.update(torch_bfloat16_forward_s=seconds, torch_bfloat16_lora_dtypes=lora_dtypes,
                   eps_torch_bfloat16_rel_l2=rel_l2(got, base),
                   **effect_figures(got_lora - got, with_lora - base, "torch_bfloat16"))
  figures["torch_peak_rss_gib"] = rss_gib()
  return base, with_lora, figures


def jax_figures(directory, x, lora_tree, precision, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mcm_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  dtype, _, weights = precision.partition(":")
  weights = weights or dtype
  name = dtype if weights == dtype else f"{dtype}_{weights}_weights"
  t0 = time.perf_counter()
  model, params = sdxl.load_unet(directory, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(weights))
  load_s = time.perf_counter() - t0
  eps = jax.jit(sdxl.make_eps_fn(model))
  run = lambda p: np.asarray(jax.block_until_ready(eps(p, x["z"], x["t"], x["cond"])))
  t0 = time.perf_counter()
  base = run(params)
  compile_s = time.perf_counter() - t0
  seconds = median_time(lambda: run(params), repeats)
  with_lora = run(lora_lib.attach(params, lora_tree))
  param_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
  del params
  gc.collect()
  return name, base, with_lora, {f"jax_{name}_forward_s": seconds,
                                 f"jax_{name}_first_call_s": compile_s, f"jax_{name}_load_s": load_s,
                                 f"jax_{name}_param_gib": param_bytes / 2 ** 30,
                                 f"jax_{name}_peak_rss_gib": rss_gib()}


def random_lora(directory, rank, b_std, seed=0):
  """A rank-``rank`` LoRA on the attention projections, a as ``lora.init_lora`` and
  b ~ N(0, b_std^2 / r), exported to a temporary directory: (tree, directory)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  unet_dir = sdxl.component_dir(directory, "unet")
  model = sdxl.unet_from_config(sdxl.read_json(os.path.join(unet_dir, "config.json")))
  shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  tree = lora_lib.init_lora(shapes, rank, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  tree = {p: {"a": np.asarray(ab["a"]),
              "b": (b_std / np.sqrt(rank) * rng.standard_normal(ab["b"].shape)).astype(
                  np.float32)}
          for p, ab in tree.items()}
  out = tempfile.mkdtemp(prefix="crosscheck_lora_")
  lora_lib.save(out, tree)
  return tree, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory")
  parser.add_argument("--latent", type=int, default=32)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--precisions", default="float32,bfloat16",
                      help="JAX runs, each 'dtype' or 'compute:weights' (e.g. float32:bfloat16)")
  parser.add_argument("--torch_bfloat16", action="store_true",
                      help="also PyTorch's own bfloat16 UNet against its float32 one: the error "
                      "bfloat16 itself costs (eps and the LoRA's effect)")
  parser.add_argument("--lora_std", type=float, default=0.05,
                      help="the scale of b (the figures report the effect on eps, lora_effect_rel)")
  args = parser.parse_args()
  x = inputs(args.latent)
  lora_tree, lora_dir = random_lora(args.directory, args.rank, args.lora_std)
  figures = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", latent=args.latent,
                 lora_modules=len(lora_tree), lora_std=args.lora_std)
  want, want_lora, f = torch_figures(args.directory, x, lora_dir, args.repeats,
                                     args.torch_bfloat16)
  figures.update(f)
  print(json.dumps(figures), file=sys.stderr, flush=True)  # so far, in case a phase dies
  want_delta = want_lora - want
  figures["lora_effect_rel"] = float(np.linalg.norm(want_delta) / np.linalg.norm(want))
  for precision in args.precisions.split(","):
    name, got, got_lora, f = jax_figures(args.directory, x, lora_tree, precision, args.repeats)
    figures.update(f)
    figures[f"eps_{name}_rel_l2"] = rel_l2(got, want)
    figures.update(effect_figures(got_lora - got, want_delta, name))
    print(json.dumps(figures), file=sys.stderr, flush=True)
  if "jax_float32_forward_s" in figures:
    figures["jax_over_torch_forward"] = (figures["jax_float32_forward_s"]
                                         / figures["torch_forward_s"])
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
