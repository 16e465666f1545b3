"""Few-step text-to-image with an MLCM LoRA on SDXL:

  python -m mcm_jax.generate --sdxl=/models/sdxl-base --lora=runs/mlcm/stage2/lora \\
      --prompt="a red fox in snow" --steps=4 --out=samples/

``--prompts=FILE`` (.txt / .jsonl / .parquet) instead of ``--prompt``. The UNet with the LoRA
attached runs the K-step MLCM sampler (``mlcm.sample``) and the VAE decodes; the whole
step is one ``jax.jit`` per (resolution, steps, batch), compiled once. Writes one PNG per prompt
and ``grid.png``. Bad input (flags, paths, a corrupt or unfitting file) ends in one message and
exit code 2 (``mcm_jax/cli.py``); ``--debug`` shows the traceback.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from mcm_jax import cli, errors, hub
from mcm_jax import lora as lora_lib
from mcm_jax import mlcm, plotting, storage
from mcm_jax.data import prompts as prompt_data
from mcm_jax.models import sdxl


def make_generator(unet, vae, steps, timesteps="uniform", sampler="ddim"):
  """Jitted ``generate(unet_params, vae_params, cond, noise, rng) -> images NHWC in [-1, 1]``;
  with ``vae=None`` it returns the latents. ``timesteps`` / ``sampler``: ``mlcm.sampling_grid``
  and ``mlcm.sample`` (``rng`` draws the 'lcm' sampler's fresh noise)."""
  grid = mlcm.sampling_grid(steps, timesteps)
  denoise = sdxl.make_denoiser(unet)
  decode = sdxl.make_decoder(vae) if vae is not None else lambda params, z: z

  @jax.jit
  def generate(unet_params, vae_params, cond, noise, rng=None):
    z = mlcm.sample(lambda zz, t: denoise(unet_params, zz, t, cond), noise, grid, sampler, rng)
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
  """UNet (LoRA attached), VAE and text encoders from a local SDXL directory, loaded once. The
  LoRA file is read first (a bad one fails before the models load); one that does not fit the
  UNet is an error naming the file, the module and the shapes."""
  parsed = lora_lib.read(lora_path) if lora_path else None  # a bad file fails before the models
  unet, unet_params = sdxl.load_unet(sdxl_dir, dtype)
  if parsed is not None:
    lora = lora_lib.load(lora_path, unet_params, parsed)
    unet_params = lora_lib.attach(unet_params, lora, lora_scale,
                                 source=f"LoRA file {lora_path}")
  vae, vae_params = sdxl.load_vae(sdxl_dir, dtype)
  return {"unet": unet, "unet_params": unet_params, "vae": vae, "vae_params": vae_params,
          "encode": sdxl.load_text_encoders(sdxl_dir), "generators": {}}


def generate_images(pipeline, prompts, steps, resolution=1024, seed=0, batch_size=4,
                    timesteps="uniform", sampler="ddim"):
  """[N, r, r, 3] images in [-1, 1] for ``prompts`` (a list), in fixed-size batches; one
  compiled generator per (steps, timesteps, sampler), kept in ``pipeline``."""
  if not 1 <= steps <= 1000:
    raise errors.UserError(f"steps={steps} is invalid; allowed: 1..1000 (MLCM is trained for "
                           "1-8)")
  if batch_size < 1:
    raise errors.UserError(f"batch_size={batch_size} is invalid; allowed: an integer >= 1")
  unet, vae = pipeline["unet"], pipeline["vae"]
  factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SDXL
  multiple = factor * 2 ** (len(unet.config["block_out_channels"]) - 1)
  if resolution < multiple or resolution % multiple:
    raise errors.UserError(f"resolution={resolution} is invalid; allowed: a positive multiple of "
                           f"{multiple}")
  key = (steps, timesteps, sampler)
  if key not in pipeline["generators"]:
    try:
      pipeline["generators"][key] = make_generator(unet, vae, steps, timesteps, sampler)
    except ValueError as e:
      raise errors.UserError(str(e)) from e
  generate = pipeline["generators"][key]
  latent = resolution // factor
  out = []
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    cond = pipeline["encode"](chunk + [chunk[-1]] * pad)  # fixed batch: one compilation
    cond["time_ids"] = sdxl.time_ids(resolution, batch_size)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), b),
                              (batch_size, latent, latent, 4))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), b)
    images = np.asarray(generate(pipeline["unet_params"], pipeline["vae_params"], cond, noise,
                                 rng))
    out.append(images[:len(chunk)])
  return np.concatenate(out)


FLAGS = flags.FLAGS


def define_pipeline_flags(out_default, flag_values=FLAGS):
  """The flags ``generate`` and ``t2i_eval`` share (defined only when run as a program, so the
  modules import cleanly beside other flag-defining modules)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("sdxl", None, "Local diffusers-layout SDXL directory (unet/, vae/, "
                      "text_encoder(_2)/, tokenizer(_2)/).", **fv)
  flags.DEFINE_string("lora", "", "MLCM LoRA: a .safetensors file or a directory holding "
                      "pytorch_lora_weights.safetensors ('' = the base model).", **fv)
  flags.DEFINE_string("prompts", None, "A prompt file (.txt / .jsonl / .parquet).", **fv)
  flags.DEFINE_integer("resolution", 1024, "Image size in pixels (a multiple of 32 for SDXL).",
                       lower_bound=1, **fv)
  flags.DEFINE_integer("batch_size", 4, "Images per jitted call.", lower_bound=1, **fv)
  flags.DEFINE_integer("seed", 0, "Noise seed.", **fv)
  flags.DEFINE_string("out", out_default, "Output directory.", **fv)


def check_pipeline_flags(flag_values, required):
  """UserError unless each flag of ``required`` is set and --sdxl / --out are usable; returns
  --sdxl as a local directory (a hub name such as stabilityai/stable-diffusion-xl-base-1.0 is
  resolved from the local Hugging Face cache, ``mcm_jax.hub``)."""
  for name in required:
    if not flag_values[name].value:
      raise errors.UserError(f"--{name} is required ({flag_values[name].help})")
  sdxl_dir = hub.local_path(flag_values.sdxl, "--sdxl")
  if storage.exists(flag_values.out) and not storage.isdir(flag_values.out):
    raise errors.UserError(f"--out={flag_values.out!r} is a file; allowed: a directory (created "
                           "if missing)")
  return sdxl_dir


def define_flags(flag_values=FLAGS):
  define_pipeline_flags("samples", flag_values)
  flags.DEFINE_float("lora_scale", 1.0, "LoRA scale.", flag_values=flag_values)
  flags.DEFINE_string("prompt", None, "One prompt (or --prompts).", flag_values=flag_values)
  flags.DEFINE_integer("steps", 4, "Sampling steps (the number of MLCM segments, 1-8).",
                       flag_values=flag_values)
  flags.DEFINE_enum("sampler", "ddim", list(mlcm.SAMPLERS),
                    "ddim: deterministic DDIM jumps between the timesteps (what MLCM LoRAs "
                    "trained here expect); lcm: LCM's sampler, x0 re-noised with fresh noise "
                    "(LCM-LoRA, TLCM).", flag_values=flag_values)
  flags.DEFINE_string("timesteps", "uniform", "uniform (MLCM's segment starts 999, 750, 500, "
                      "250), trailing (999, 749, 499, 249), lcm (LCMScheduler's 999, 759, 499, "
                      "259) or an explicit list, e.g. 999,749,499,124 (one per step).",
                      flag_values=flag_values)


def parse_flags(argv, flag_values=FLAGS):
  """Defines and parses this program's flags (absl's flags_parser)."""
  define_flags(flag_values)
  return cli.parse_flags(argv, flag_values)


def main(argv, flag_values=FLAGS):
  del argv
  f = flag_values
  if (f.prompt is None) == (f.prompts is None):
    raise errors.UserError("pass exactly one of --prompt (one prompt) and --prompts (a file)")
  sdxl_dir = check_pipeline_flags(f, ("sdxl",))
  if not 1 <= f.steps <= 1000:
    raise errors.UserError(f"--steps={f.steps} is invalid; allowed: 1..1000 (MLCM: 1-8)")
  if not np.isfinite(f.lora_scale):
    raise errors.UserError(f"--lora_scale={f.lora_scale} is invalid; allowed: a finite number")
  try:  # before any model loads
    mlcm.sampling_grid(f.steps, f.timesteps)
  except ValueError as e:
    raise errors.UserError(f"--timesteps / --steps: {e}") from e
  prompts = [f.prompt] if f.prompt is not None else prompt_data.load_prompts(f.prompts)
  pipeline = load_pipeline(sdxl_dir, f.lora, f.lora_scale)
  images = generate_images(pipeline, prompts, f.steps, f.resolution, f.seed, f.batch_size,
                           f.timesteps, f.sampler)
  storage.makedirs(f.out)
  for i, (prompt, image) in enumerate(zip(prompts, images)):
    plotting.save_image(os.path.join(f.out, f"{i:05d}_{_slug(prompt)}.png"), image)
  plotting.image_grid(os.path.join(f.out, "grid.png"), images)
  logging.info("%d images (%d steps) -> %s", len(images), f.steps, f.out)


if __name__ == "__main__":
  cli.run(main, parse_flags)
