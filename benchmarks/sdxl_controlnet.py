"""An SDXL ControlNet at full size: made in diffusers' layout (once), read by
``sdxl.load_controlnet`` and run against diffusers' PyTorch ``ControlNetModel`` on the same fp16
file; one JSON line.

  python benchmarks/sdxl_controlnet.py DIR OUT [--latent=32]

DIR: an SDXL directory (a real one, or ``benchmarks/make_random_sdxl.py``'s). OUT: a ControlNet
directory; when it holds no weights, one is made from DIR's UNet as diffusers'
``ControlNetModel.from_unet`` does (the architecture of diffusers/controlnet-canny-sdxl-1.0),
with its zero convolutions and conditioning embedding drawn at random (a trained ControlNet's
are not zero; zeros would hide a wrong residual path) and written in float16. A real ControlNet
directory may be given instead. Figures: the make and load times, the residuals' relative L2
(JAX float32 vs PyTorch float32, the worst of the down residuals and the mid one) at
``--latent`` latents (a control image 8x that), the size of the residuals against the skips
they are added to, and peak RSS.
"""
import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sdxl_crosscheck import inputs, rel_l2, rss_gib  # pylint: disable=wrong-import-position

WEIGHTS = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")


def make(directory, out):
  """A ControlNet of DIR's UNet in OUT (fp16): the UNet's weights for its encoder half, the
  rest ~ N(0, 1 / fan_in)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import ControlNetModel, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  variant = "fp16" if os.path.isfile(os.path.join(directory, "unet", WEIGHTS[0])) else None
  unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", variant=variant,
                                              torch_dtype=torch.float16)
  net = ControlNetModel.from_unet(unet)
  del unet
  gc.collect()
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                          "controlnet_cond_embedding")):
        if p.ndim >= 2:
          p.copy_(torch.randn_like(p, dtype=torch.float32) / p[0].numel() ** 0.5)
        else:
          p.zero_()
  net.save_pretrained(out, variant="fp16")


def jax_residuals(directory, out, x, control):
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top
  unet_config = sdxl.read_json(os.path.join(sdxl.component_dir(directory, "unet"), "config.json"))
  start = time.perf_counter()
  net, params = sdxl.load_controlnet(out, sdxl.unet_from_config(unet_config))
  load_s = time.perf_counter() - start
  cond = x["cond"]
  run = jax.jit(lambda p, z, t, c, tx, ti, img: net.apply(
      {"params": p}, z, t, c, {"text_embeds": tx, "time_ids": ti}, img))
  args = (params, x["z"].transpose(0, 3, 1, 2), x["t"].astype(np.float32), cond["context"],
          cond["text_embeds"], cond["time_ids"], control)
  down, mid = run(*args)
  jax.block_until_ready(mid)
  start = time.perf_counter()
  down, mid = run(*args)
  jax.block_until_ready(mid)
  forward_s = time.perf_counter() - start
  count = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
  return [np.asarray(d) for d in down] + [np.asarray(mid)], dict(
      params=count, jax_load_s=round(load_s, 1), jax_forward_s=round(forward_s, 2))


def torch_residuals(out, x, control):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import ControlNetModel  # pylint: disable=g-import-not-at-top
  variant = "fp16" if os.path.isfile(os.path.join(out, WEIGHTS[0])) else None
  net = ControlNetModel.from_pretrained(out, variant=variant, torch_dtype=torch.float32).eval()
  cond = x["cond"]
  with torch.no_grad():
    res = net(torch.from_numpy(x["z"]).permute(0, 3, 1, 2), torch.from_numpy(x["t"]),
              torch.from_numpy(cond["context"]), torch.from_numpy(control),
              added_cond_kwargs={k: torch.from_numpy(cond[k]) for k in ("text_embeds",
                                                                         "time_ids")})
  return [d.numpy() for d in res.down_block_res_samples] + [res.mid_block_res_sample.numpy()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dir")
  parser.add_argument("out")
  parser.add_argument("--latent", type=int, default=32)
  args = parser.parse_args()
  figures = dict(machine=platform.machine(), cpus=os.cpu_count(), latent=args.latent)
  if not any(os.path.isfile(os.path.join(args.out, w)) for w in WEIGHTS):
    start = time.perf_counter()
    make(args.dir, args.out)
    figures["make_s"] = round(time.perf_counter() - start, 1)
    gc.collect()
  x = inputs(args.latent)
  control = np.random.default_rng(1).uniform(
      0, 1, (1, 3, 8 * args.latent, 8 * args.latent)).astype(np.float32)
  ours, jax_figures = jax_residuals(args.dir, args.out, x, control)
  figures.update(jax_figures)
  gc.collect()
  theirs = torch_residuals(args.out, x, control)
  figures.update(
      residuals=len(theirs),
      down_f32_rel_l2_max=max(rel_l2(a, b) for a, b in zip(ours[:-1], theirs[:-1])),
      mid_f32_rel_l2=rel_l2(ours[-1], theirs[-1]),
      residual_rms=[round(float(np.sqrt(np.mean(r ** 2))), 3) for r in theirs],
      peak_rss_gib=round(rss_gib(), 2))
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
