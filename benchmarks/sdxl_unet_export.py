"""A full-UNet student's export at full size (``sdxl.save_unet``), read back by diffusers /
PyTorch: one JSON line of figures.

  python benchmarks/sdxl_unet_export.py DIR [OUT] [--latent=32] [--cond_dim=256]

DIR: an SDXL directory (a real one, or ``benchmarks/make_random_sdxl.py``'s). Its UNet is read in
float32 and made LCM's guidance-conditioned student (``sdxl.with_guidance_embedding``), with a
random ``cond_proj`` (a trained student's is not zero; a zero one would hide a wrong guidance
input), then written to OUT (default a temporary folder) as ``config.json`` +
``diffusion_pytorch_model.fp16.safetensors``. Figures: the export's time, size and peak RSS;
diffusers' ``UNet2DConditionModel.from_pretrained(OUT, variant='fp16')`` with every weight
consumed (missing / unexpected counts); eps at w = 8 (``timestep_cond = scale_embedding(7)``)
of the file read back by ``sdxl.load_unet`` against PyTorch's on the same fp16 weights, both in
float32 (relative L2), and how much w moves eps (w = 8 against w = 3), for scale.
"""
import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sdxl_crosscheck import inputs, rel_l2, rss_gib  # pylint: disable=wrong-import-position


def export(directory, out, cond_dim):
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model, params = sdxl.load_unet(directory)
  load_s = time.perf_counter() - start
  model = sdxl.with_guidance_embedding(model, cond_dim)
  params = sdxl.zero_guidance_projection(model, params)
  kernel = params["time_embedding"]["cond_proj"]["kernel"]
  params["time_embedding"]["cond_proj"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(0), kernel.shape) / np.sqrt(kernel.shape[0])
  start = time.perf_counter()
  path = sdxl.save_unet(out, model, params, "float16")
  figures = dict(load_f32_s=round(load_s, 1), export_s=round(time.perf_counter() - start, 1),
                 export_gib=round(os.path.getsize(path) / 2 ** 30, 3),
                 params=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
                 export_peak_rss_gib=round(rss_gib(), 2))
  return figures


def jax_eps(out, x, cond_dim):
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax import guidance  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  model, params = sdxl.load_unet(out)  # the fp16 file, computed in float32
  eps = jax.jit(sdxl.make_eps_fn(model))
  return [np.asarray(eps(params, x["z"], x["t"], dict(x["cond"], timestep_cond=np.asarray(
      guidance.scale_embedding(np.array([w - 1.0]), cond_dim))))) for w in (8.0, 3.0)]


def torch_eps(out, x, cond_dim):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  unet, info = UNet2DConditionModel.from_pretrained(out, variant="fp16", torch_dtype=torch.float32,
                                                    output_loading_info=True)
  unet.eval()
  w = torch.tensor([7.0])
  emb = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, cond_dim)
  with torch.no_grad():
    eps = unet(torch.from_numpy(x["z"]).permute(0, 3, 1, 2), torch.from_numpy(x["t"]),
               torch.from_numpy(x["cond"]["context"]), timestep_cond=emb,
               added_cond_kwargs={k: torch.from_numpy(x["cond"][k])
                                  for k in ("text_embeds", "time_ids")}).sample
  figures = {f"torch_{k}": len(v) for k, v in info.items()}
  figures["torch_time_cond_proj_dim"] = unet.config.time_cond_proj_dim
  return eps.permute(0, 2, 3, 1).numpy(), figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dir")
  parser.add_argument("out", nargs="?", default="")
  parser.add_argument("--latent", type=int, default=32)
  parser.add_argument("--cond_dim", type=int, default=256)
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="unet_export_")
  x = inputs(args.latent)
  figures = dict(machine=platform.machine(), cpus=os.cpu_count(), latent=args.latent)
  figures.update(export(args.dir, out, args.cond_dim))
  gc.collect()
  ours, other_w = jax_eps(out, x, args.cond_dim)
  gc.collect()
  theirs, torch_figures = torch_eps(out, x, args.cond_dim)
  figures.update(torch_figures)
  figures.update(eps_f32_rel_l2=rel_l2(ours, theirs), w8_vs_w3_rel_l2=rel_l2(other_w, theirs),
                 peak_rss_gib=round(rss_gib(), 2))
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
