"""Few-step text-to-image with an MLCM LoRA on SDXL:

  python -m mcm_jax.generate --sdxl=/models/sdxl-base --lora=runs/mlcm/stage2/lora \\
      --prompt="a red fox in snow" --steps=4 --out=samples/

``--prompts=FILE`` (.txt / .jsonl / .parquet) instead of ``--prompt``. The UNet with the merged
LoRA runs the K-step MLCM sampler (``mlcm.sample``) and the VAE decodes; the whole
step is one ``jax.jit`` per (resolution, steps, batch), compiled once. Writes one PNG per prompt
and ``grid.png``.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from mcm_jax import lora as lora_lib
from mcm_jax import mlcm, plotting
from mcm_jax.data import prompts as prompt_data
from mcm_jax.models import sdxl


def make_generator(unet, vae, steps):
  """Jitted ``generate(unet_params, vae_params, cond, noise) -> images NHWC in [-1, 1]``; with
  ``vae=None`` it returns the latents."""
  denoise = sdxl.make_denoiser(unet)
  decode = sdxl.make_decoder(vae) if vae is not None else lambda params, z: z

  @jax.jit
  def generate(unet_params, vae_params, cond, noise):
    z = mlcm.sample(lambda zz, t: denoise(unet_params, zz, t, cond), noise, steps)
    return decode(vae_params, z)

  return generate


def write_sample_grid(directory, unet, unet_params, cond, noise, steps, vae=None,
                      vae_params=None):
  """A K-step sample grid: images through the VAE if given (``samples_<K>step.png``), else the
  latents' first 3 channels scaled to [-1, 1] (``latents_<K>step.png``). Returns its path."""
  out = np.asarray(make_generator(unet, vae, steps)(unet_params, vae_params, cond, noise))
  if vae is not None:
    path = os.path.join(directory, f"samples_{steps}step.png")
    plotting.image_grid(path, out)
    return path
  latents = out[..., :3]
  path = os.path.join(directory, f"latents_{steps}step.png")
  plotting.image_grid(path, np.clip(latents / (np.abs(latents).max() + 1e-8), -1, 1))
  return path


def _slug(text, n=40):
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def load_pipeline(sdxl_dir, lora_path="", lora_scale=1.0, dtype=jnp.float32):
  """UNet (LoRA merged), VAE and text encoders from a local SDXL directory, loaded once."""
  unet, unet_params = sdxl.load_unet(sdxl_dir, dtype)
  vae, vae_params = sdxl.load_vae(sdxl_dir, dtype)
  if lora_path:
    unet_params = lora_lib.merge(unet_params, lora_lib.load(lora_path), lora_scale)
  return {"unet": unet, "unet_params": unet_params, "vae": vae, "vae_params": vae_params,
          "encode": sdxl.load_text_encoders(sdxl_dir), "generators": {}}


def generate_images(pipeline, prompts, steps, resolution=1024, seed=0, batch_size=4):
  """[N, r, r, 3] images in [-1, 1] for ``prompts`` (a list), in fixed-size batches; one
  compiled generator per step count (kept in ``pipeline``)."""
  if not 1 <= steps <= 1000:
    raise ValueError(f"steps={steps} is invalid; allowed: 1..1000 (MLCM is trained for 1-8)")
  unet, vae = pipeline["unet"], pipeline["vae"]
  factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SDXL
  multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
  if resolution % multiple:
    raise ValueError(f"resolution={resolution} is invalid; allowed: a multiple of {multiple}")
  if steps not in pipeline["generators"]:
    pipeline["generators"][steps] = make_generator(unet, vae, steps)
  generate = pipeline["generators"][steps]
  latent = resolution // factor
  out = []
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    cond = pipeline["encode"](chunk + [chunk[-1]] * pad)  # fixed batch: one compilation
    cond["time_ids"] = sdxl.time_ids(resolution, batch_size)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), b),
                              (batch_size, latent, latent, 4))
    images = np.asarray(generate(pipeline["unet_params"], pipeline["vae_params"], cond, noise))
    out.append(images[:len(chunk)])
  return np.concatenate(out)


FLAGS = flags.FLAGS


def define_pipeline_flags(out_default):
  """The flags ``generate`` and ``t2i_eval`` share (defined only when run as a program, so the
  modules import cleanly beside other flag-defining modules)."""
  flags.DEFINE_string("sdxl", None, "Local diffusers-layout SDXL directory (unet/, vae/, "
                      "text_encoder(_2)/, tokenizer(_2)/).")
  flags.DEFINE_string("lora", "", "MLCM LoRA: a .safetensors file or a directory holding "
                      "pytorch_lora_weights.safetensors ('' = the base model).")
  flags.DEFINE_string("prompts", None, "A prompt file (.txt / .jsonl / .parquet).")
  flags.DEFINE_integer("resolution", 1024, "Image size in pixels (a multiple of 32 for SDXL).")
  flags.DEFINE_integer("batch_size", 4, "Images per jitted call.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_string("out", out_default, "Output directory.")


def define_flags():
  define_pipeline_flags("samples")
  flags.DEFINE_float("lora_scale", 1.0, "LoRA scale.")
  flags.DEFINE_string("prompt", None, "One prompt (or --prompts).")
  flags.DEFINE_integer("steps", 4, "Sampling steps (the number of MLCM segments, 1-8).")


def main(argv):
  del argv
  if (FLAGS.prompt is None) == (FLAGS.prompts is None):
    raise app.UsageError("pass exactly one of --prompt and --prompts")
  if not FLAGS.sdxl:
    raise app.UsageError("--sdxl (a local SDXL directory) is required")
  prompts = [FLAGS.prompt] if FLAGS.prompt is not None else prompt_data.load_prompts(
      FLAGS.prompts)
  if not 1 <= FLAGS.steps <= 1000:
    raise app.UsageError(f"--steps={FLAGS.steps} is invalid; allowed: 1..1000 (MLCM: 1-8)")
  pipeline = load_pipeline(FLAGS.sdxl, FLAGS.lora, FLAGS.lora_scale)
  images = generate_images(pipeline, prompts, FLAGS.steps, FLAGS.resolution, FLAGS.seed,
                           FLAGS.batch_size)
  os.makedirs(FLAGS.out, exist_ok=True)
  for i, (prompt, image) in enumerate(zip(prompts, images)):
    plotting.save_image(os.path.join(FLAGS.out, f"{i:05d}_{_slug(prompt)}.png"), image)
  plotting.image_grid(os.path.join(FLAGS.out, "grid.png"), images)
  logging.info("%d images (%d steps) -> %s", len(images), FLAGS.steps, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
