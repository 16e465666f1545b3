"""SDXL's text encoders and VAE at full size, JAX against diffusers / transformers PyTorch on the
same directory: one JSON line of figures.

  python benchmarks/sdxl_components_crosscheck.py DIR [--latent=32]

DIR: an SDXL directory (a real one, or ``benchmarks/make_random_sdxl.py``'s). Figures, all in
float32 (relative L2 against PyTorch's):
- the prompt conditioning: ``sdxl_text.load_text_encoders(DIR)`` (both CLIP encoders, penultimate
  hidden states concatenated, encoder 2's projected pooled output) against diffusers'
  ``StableDiffusionXLPipeline.encode_prompt`` with the directory's encoders and tokenizers, for
  a short prompt, a long one (truncated at 77 tokens) and the empty one;
- the VAE: ``sdxl.load_vae``'s decoder on ``--latent`` latents against
  ``AutoencoderKL.decode`` (before any clipping), and its encoder's posterior mean on the decoded
  image against ``AutoencoderKL.encode``'s;
each side's load time and peak RSS.
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
from sdxl_crosscheck import rel_l2, rss_gib  # pylint: disable=wrong-import-position

PROMPTS = ["a red fox in the snow",
           "a lighthouse at dusk on a rocky coast, oil painting with thick impasto brush strokes, "
           "warm orange light from the lamp, dark blue sea, seagulls, clouds lit from below, "
           "by a nineteenth-century master, highly detailed, museum photograph, gallery light",
           ""]


def variant(path):
  return "fp16" if any(f.endswith(".fp16.safetensors") for f in os.listdir(path)) else None


def jax_side(directory, latents):
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax.models import sdxl, sdxl_text  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  encode = sdxl_text.load_text_encoders(directory)
  figures = {"jax_text_load_s": round(time.perf_counter() - start, 1)}
  cond = {k: np.asarray(v) for k, v in encode(PROMPTS).items()}
  del encode
  gc.collect()
  vae, params = sdxl.load_vae(directory)
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / vae.config.scaling_factor,
                                          method=vae.decode).sample)
  images = np.asarray(decode(params, latents.transpose(0, 3, 1, 2)))
  posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean)
  mean = np.asarray(posterior(params, np.clip(images, -1, 1)))
  figures["jax_peak_rss_gib"] = round(rss_gib(), 2)
  return cond, images, mean, figures


def torch_side(directory, latents, images):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, StableDiffusionXLPipeline  # pylint: disable=g-import-not-at-top
  part = lambda cls, name: cls.from_pretrained(
      os.path.join(directory, name), variant=variant(os.path.join(directory, name)),
      torch_dtype=torch.float32).eval()
  start = time.perf_counter()
  pipe = StableDiffusionXLPipeline(
      vae=None, unet=None, scheduler=None,
      text_encoder=part(transformers.CLIPTextModel, "text_encoder"),
      text_encoder_2=part(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer")),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(
          os.path.join(directory, "tokenizer_2")))
  figures = {"torch_text_load_s": round(time.perf_counter() - start, 1)}
  with torch.no_grad():
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
  cond = {"context": context.numpy(), "text_embeds": pooled.numpy()}
  del pipe
  gc.collect()
  vae = part(AutoencoderKL, "vae")
  with torch.no_grad():
    decoded = vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
                         / vae.config.scaling_factor).sample.numpy()
    mean = vae.encode(torch.from_numpy(np.clip(images, -1, 1))).latent_dist.mean.numpy()
  mean = mean.transpose(0, 2, 3, 1)  # NHWC, as the Flax VAE's posterior
  figures["torch_peak_rss_gib"] = round(rss_gib(), 2)
  return cond, decoded, mean, figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dir")
  parser.add_argument("--latent", type=int, default=32)
  args = parser.parse_args()
  latents = np.random.default_rng(0).standard_normal((1, args.latent, args.latent, 4),
                                                     np.float32)
  figures = dict(machine=platform.machine(), cpus=os.cpu_count(), latent=args.latent)
  cond, images, mean, jax_figures = jax_side(args.dir, latents)
  figures.update(jax_figures)
  gc.collect()
  their_cond, their_images, their_mean, torch_figures = torch_side(args.dir, latents, images)
  figures.update(torch_figures)
  for i, name in enumerate(("short", "long", "empty")):
    figures[f"context_{name}_rel_l2"] = rel_l2(cond["context"][i], their_cond["context"][i])
    figures[f"text_embeds_{name}_rel_l2"] = rel_l2(cond["text_embeds"][i],
                                                   their_cond["text_embeds"][i])
  figures.update(vae_decode_rel_l2=rel_l2(images, their_images),
                 vae_encode_mean_rel_l2=rel_l2(mean, their_mean),
                 decoded_outside_unit_range=round(float(np.mean(np.abs(their_images) > 1)), 3),
                 peak_rss_gib=round(rss_gib(), 2))
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
