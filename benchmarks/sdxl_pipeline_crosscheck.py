"""``mcm_jax.pipeline`` against diffusers' PyTorch SDXL pipelines on a full-size SDXL directory:
one JSON line of figures.

  python benchmarks/sdxl_pipeline_crosscheck.py DIR [--resolution=256] [--steps=4]

Float32, batch 1, the same initial noise: the guided teacher (``--guidance`` with
``--negative``, Euler on the 'leading' grid) against ``StableDiffusionXLPipeline`` with the
directory's scheduler, and image-to-image (strength 0.5 from the teacher's image) against
``StableDiffusionXLImg2ImgPipeline`` given the same two random draws. Reports the largest
absolute difference of the images in [0, 1] and each side's seconds per image (JAX: the
second call, compiled). PyTorch runs in a child process first, so the peak stays near one
float32 pipeline.
"""
import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPT = "a red fox in the snow"


def draws(res):
  """The JAX draws ``pipeline.generate_images(seed=0)`` makes for batch 0: start noise and the
  VAE-posterior noise, NHWC."""
  import jax  # pylint: disable=g-import-not-at-top
  from mcm_jax import seeds  # pylint: disable=g-import-not-at-top
  shape = (1, res // 8, res // 8, 4)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), shape)
  posterior = jax.random.normal(jax.random.fold_in(seeds.key(0, "vae_posterior"), 0), shape)
  return np.asarray(noise), np.asarray(posterior)


def torch_side(args, noise, posterior, out):
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers.models.autoencoders import vae as torch_vae  # pylint: disable=g-import-not-at-top
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as i2i  # pylint: disable=g-import-not-at-top
  variant = "fp16" if os.path.isfile(os.path.join(
      args.directory, "unet", "diffusion_pytorch_model.fp16.safetensors")) else None
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
      args.directory, variant=variant, torch_dtype=torch.float32, add_watermarker=False)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
            width=args.resolution, output_type="np")
  start = time.perf_counter()
  with torch.no_grad():
    teacher = pipe(prompt=PROMPT, negative_prompt=args.negative, latents=nchw(noise), **kw).images
  teacher_s = time.perf_counter() - start
  queue = [nchw(posterior), nchw(noise)]
  ours_first = lambda shape, **unused: queue.pop(0)
  torch_vae.randn_tensor = i2i.randn_tensor = ours_first
  img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
  start = time.perf_counter()
  with torch.no_grad():
    styled = img2img(prompt=PROMPT, negative_prompt=args.negative,
                     image=torch.from_numpy(teacher).permute(0, 3, 1, 2), strength=0.5,
                     **kw).images
  np.savez(out, teacher=teacher, img2img=styled, teacher_s=teacher_s,
           img2img_s=time.perf_counter() - start,
           rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory")
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--guidance", type=float, default=8.0)
  parser.add_argument("--negative", default="blurry, low quality")
  args = parser.parse_args()
  noise, posterior = draws(args.resolution)
  out = os.path.join("/tmp", f"sdxl_pipeline_crosscheck_{os.getpid()}.npz")
  child = multiprocessing.get_context("spawn").Process(target=torch_side,
                                                       args=(args, noise, posterior, out))
  child.start()
  child.join()
  if child.exitcode:
    sys.exit(f"the PyTorch side failed (exit code {child.exitcode})")
  ref = dict(np.load(out))
  os.remove(out)

  from mcm_jax import pipeline  # pylint: disable=g-import-not-at-top
  models = pipeline.load_pipeline(args.directory)
  kw = dict(resolution=args.resolution, batch_size=1, timesteps="leading",
            guidance_scale=args.guidance, negative_prompt=args.negative)
  timed = {}
  for name, extra in (("teacher", {}),
                      ("img2img", dict(init_images=ref["teacher"][0] * 2 - 1, strength=0.5))):
    pipeline.generate_images(models, [PROMPT], args.steps, **kw, **extra)  # compiles
    start = time.perf_counter()
    images = pipeline.generate_images(models, [PROMPT], args.steps, **kw, **extra)
    timed[name] = (time.perf_counter() - start, (images + 1) / 2)
  figures = {"machine": platform.machine(), "cpus": os.cpu_count(),
             "resolution": args.resolution, "steps": args.steps, "guidance": args.guidance}
  for name, (seconds, images) in timed.items():
    figures[f"{name}_max_abs_diff"] = float(np.abs(images - ref[name]).max())
    figures[f"{name}_jax_s"] = round(seconds, 2)
    figures[f"{name}_torch_s"] = round(float(ref[f"{name}_s"]), 2)
  figures["torch_peak_rss_gib"] = round(float(ref["rss_gib"]), 2)
  figures["jax_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                                      2)
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
