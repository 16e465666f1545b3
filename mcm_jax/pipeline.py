"""Text-to-image with SDXL (and an MLCM LoRA): models loaded once, one jitted generator per
(steps, timesteps, sampler, guided), fixed-size batches.

With ``guidance_scale`` w != 1 the UNet is guided, ``x_w = x_u + w (x_c - x_u)`` (diffusers'
classifier-free guidance; the same on eps or x, ``guidance``), with the unconditional branch of
diffusers' SDXL pipeline: the encoding of ``negative_prompt``, or zero embeddings when there is
none and the directory's ``force_zeros_for_empty_prompt`` holds. The 'ddim' sampler on the
'leading' grid is diffusers' ``EulerDiscreteScheduler`` as SDXL ships it (Euler on the
probability-flow ODE in sigma = sigma_t / alpha_t is DDIM in z_t), so ``steps=25,
timesteps='leading', guidance_scale=w`` without a LoRA is the guided-teacher baseline.
A guidance-conditioned UNet (LCM §4.2; ``time_cond_proj_dim`` in its config) takes w as
``timestep_cond = guidance.scale_embedding(w - 1)`` instead, in one unguided call, as diffusers'
SDXL pipeline runs it.

Image-to-image (diffusers' ``strength`` semantics): of the K-step grid the last
``int(K strength)`` timesteps run, from ``z = alpha_t x0 + sigma_t noise`` at the first of them,
x0 the VAE posterior sample of the init image.

With a ControlNet (``load_pipeline(controlnet_dir=...)``) every UNet call first runs the
ControlNet on the control image (both branches of a guided call see it, as in diffusers'
``StableDiffusionXLControlNetPipeline``) and adds its residuals, scaled by ``controlnet_scale``.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mcm_jax import errors, guidance, plotting, seeds
from mcm_jax import lora as lora_lib
from mcm_jax.models import sdxl, sdxl_controlnet, sdxl_text
from mcm_jax.samplers import discrete
from mcm_jax.samplers.addim import bcast

PROGRESS_EVERY_S = 30  # generate_images logs its progress at most this often


def strength_grid(grid, strength):
  """The part of a sampling grid (K timesteps, then 0) that image-to-image runs: its last
  ``int(K strength)`` timesteps and the clean end (diffusers' ``get_timesteps``)."""
  k = len(grid) - 1
  if not 0 < strength <= 1 or int(k * strength) < 1:
    raise errors.UserError(f"strength={strength} is invalid for {k} steps; allowed: 0 < strength "
                           f"<= 1 with int(steps * strength) >= 1 (here strength >= {1 / k:g})")
  return np.asarray(grid)[k - int(k * strength):]


def make_generator(unet, vae, steps, timesteps="uniform", sampler="ddim", strength=1.0,
                   gamma=0.3, controlnet=None):
  """Jitted ``generate(unet_params, vae_params, cond, noise, rng, uncond=None, scale=1.0,
  init=None) -> images NHWC in [-1, 1]``; with ``vae=None`` it returns the latents.
  ``timesteps`` / ``sampler``: ``discrete.sampling_grid`` and ``discrete.sample`` (``rng`` draws
  the 'lcm' / 'tcd' sampler's fresh noise; ``gamma``: TCD's stochasticity). ``uncond`` ([1, ...]
  conditioning) and ``scale`` guide the UNet (``guidance.guided``). ``init`` (latents of an init
  image) starts the ``strength_grid`` part of the grid from ``alpha_t init + sigma_t noise``;
  without it ``noise`` is z at the grid's top. With a ``controlnet``, ``unet_params`` is
  ``sdxl_controlnet.Controlled`` and ``cond`` / ``uncond`` carry 'control' and 'control_scale'
  (``sdxl.make_eps_fn``)."""
  grid = discrete.sampling_grid(steps, timesteps)
  if strength != 1.0:
    grid = strength_grid(grid, strength)
  denoise = sdxl.make_denoiser(unet, controlnet)
  decode = sdxl.make_decoder(vae) if vae is not None else lambda params, z: z

  @jax.jit
  def generate(unet_params, vae_params, cond, noise, rng=None, uncond=None, scale=1.0,
               init=None):
    f = lambda zz, tt, cc: denoise(unet_params, zz, tt, cc)
    z = noise
    if init is not None:
      alpha, sigma = discrete.alpha_sigma(jnp.full(noise.shape[:1], grid[0]))
      z = bcast(alpha, init) * init + bcast(sigma, noise) * noise
    z = discrete.sample(lambda zz, t: guidance.guided(f, zz, t, cond, uncond, scale)[0], z, grid,
                        sampler, rng, gamma)
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


@dataclasses.dataclass
class Pipeline:
  """An SDXL directory's models, loaded once; ``encode(prompts) -> {'context', 'text_embeds'}``;
  ``encode_image(vae_params, images, eps) -> latents`` (jitted ``sdxl.make_encoder``);
  ``generators`` caches the compiled generators by (steps, timesteps, sampler, strength,
  gamma); ``controlnet`` / ``controlnet_params``: an attached ControlNet, or None."""
  unet: object
  unet_params: dict
  vae: object
  vae_params: dict
  encode: object
  encode_image: object
  zeros_for_empty_prompt: bool = True
  controlnet: object = None
  controlnet_params: dict = None
  generators: dict = dataclasses.field(default_factory=dict)


def load_pipeline(sdxl_dir, lora_path="", lora_scale=1.0, dtype=jnp.float32, unet_dir="",
                  controlnet_dir=""):
  """UNet (LoRA attached), VAE and text encoders from a local SDXL directory; ``unet_dir``: a
  diffusers UNet directory used instead of the SDXL directory's UNet (e.g. a full-UNet student
  that ``mcm_jax.main`` exported, ``stage<i>/unet``); ``controlnet_dir``: a diffusers SDXL
  ControlNet directory to attach (``sdxl.load_controlnet``). ``lora_path``: a
  LoRA file or directory, or a list of them with ``lora_scale`` a list of the same length
  (stacked, ``lora.combine``); '' or [] = the base model. The files are read first (a bad one
  fails before the models load); one that does not fit the UNet is an error naming the file, the
  module and the shapes."""
  paths, scales = _lora_list(lora_path, lora_scale)
  parsed = [lora_lib.read(p) for p in paths]  # a bad file fails before the models load
  unet, unet_params = sdxl.load_unet(unet_dir or sdxl_dir, dtype)
  unet_params = _attach(unet_params, paths, parsed, scales)
  controlnet, controlnet_params = (sdxl.load_controlnet(controlnet_dir, unet, dtype)
                                  if controlnet_dir else (None, None))
  vae, vae_params = sdxl.load_vae(sdxl_dir, dtype)
  return Pipeline(unet, unet_params, vae, vae_params, sdxl_text.load_text_encoders(sdxl_dir),
                  jax.jit(sdxl.make_encoder(vae)),
                  sdxl_text.force_zeros_for_empty_prompt(sdxl_dir), controlnet,
                  controlnet_params)


def _lora_list(lora_path, lora_scale):
  """(paths, scales): one path or a list ('' entries dropped), one scale each."""
  paths = [lora_path] if isinstance(lora_path, str) else list(lora_path)
  paths = [p for p in paths if p]
  scales = [lora_scale] * len(paths) if np.ndim(lora_scale) == 0 else list(lora_scale)
  if len(scales) != len(paths):
    raise errors.UserError(f"{len(paths)} LoRA files but {len(scales)} scales ({scales}); "
                           "allowed: one scale per LoRA, or one scale for all")
  return paths, scales


def _attach(unet_params, paths, parsed, scales):
  """``unet_params`` with the parsed LoRA files stacked (``lora.combine``) and attached."""
  if not paths:
    return unet_params
  loras = [(lora_lib.load(p, unet_params, r), s) for p, r, s in zip(paths, parsed, scales)]
  return lora_lib.attach(unet_params, lora_lib.combine(loras), 1.0,
                         source=f"LoRA file(s) {', '.join(paths)}")


def with_loras(models, lora_path="", lora_scale=1.0, read=None):
  """``models`` with its base UNet's parameters and other LoRAs (``load_pipeline``'s
  ``lora_path`` / ``lora_scale``) attached instead of its own: the VAE, text encoders and
  compiled generators are shared, nothing is loaded again. ``read``: {path: ``lora.read(path)``}
  of files already read."""
  paths, scales = _lora_list(lora_path, lora_scale)
  read = read or {}
  parsed = [read[p] if p in read else lora_lib.read(p) for p in paths]
  base = getattr(models.unet_params, "params", models.unet_params)
  return dataclasses.replace(models, unet_params=_attach(base, paths, parsed, scales))


def check_generation(steps, batch_size, guidance_scale, gamma=0.3):
  """UserError for a step count, batch size, guidance scale or TCD gamma that cannot be used."""
  if not 1 <= steps <= 1000:
    raise errors.UserError(f"steps={steps} is invalid; allowed: 1..1000 (MLCM LoRAs are trained "
                           "for 1-8; the guided teacher is sampled with e.g. 25)")
  if batch_size < 1:
    raise errors.UserError(f"batch_size={batch_size} is invalid; allowed: an integer >= 1")
  if not np.isfinite(guidance_scale):
    raise errors.UserError(f"guidance_scale={guidance_scale} is invalid; allowed: a finite "
                           "number (1 = no guidance)")
  if not 0 <= gamma <= 1:
    raise errors.UserError(f"gamma={gamma} is invalid; allowed: 0 <= gamma <= 1 (TCD's eta)")


def _padded(images, pad):
  """``images`` with the last one repeated ``pad`` times (a fixed batch: one compile)."""
  return np.concatenate([images, np.repeat(images[-1:], pad, 0)])


def _image_batch(images, n, resolution, channels, what):
  """``images`` ([r, r, C] for every prompt, or [n, r, r, C]) as float32 [n, r, r, C]; a
  UserError naming ``what`` when the shape does not fit."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = np.broadcast_to(images, (n,) + images.shape)
  if images.shape != (n, resolution, resolution, channels):
    raise errors.UserError(f"{what} of shape {images.shape} do not fit {n} prompts at "
                           f"resolution={resolution}; allowed: [{resolution}, {resolution}, "
                           f"{channels}] or [{n}, {resolution}, {resolution}, {channels}]")
  return images


def _check_control(pipeline, control_images, n, resolution, latent):
  """The control images in [0, 1] (given in [-1, 1]), checked against the pipeline's
  ControlNet: its pixel factor over the latents and its conditioning channels."""
  if pipeline.controlnet is None:
    if control_images is not None:
      raise errors.UserError("control images were given but the pipeline has no ControlNet; "
                             "load one with load_pipeline(controlnet_dir=...) (--controlnet)")
    return None
  if control_images is None:
    raise errors.UserError("this pipeline has a ControlNet: pass control images "
                           "(--control_image)")
  config = pipeline.controlnet.config
  factor = sdxl_controlnet.pixel_factor(config)
  if latent * factor != resolution:
    raise errors.UserError(f"the ControlNet takes control images {factor}x the latents' size "
                           f"({latent * factor} px) but the VAE's latents are 1/"
                           f"{resolution // latent} of resolution={resolution}; allowed: a "
                           "ControlNet made for this SDXL's VAE")
  images = _image_batch(control_images, n, resolution, config.get("conditioning_channels", 3),
                        "control images")
  return (images + 1.0) / 2.0


def generate_images(pipeline, prompts, steps, resolution=1024, seed=0, batch_size=4,
                    timesteps="uniform", sampler="ddim", guidance_scale=1.0,
                    negative_prompt=None, init_images=None, strength=1.0, gamma=0.3,
                    control_images=None, controlnet_scale=1.0):
  """[N, r, r, 3] images in [-1, 1] for ``prompts`` (a list), in fixed-size batches. Batch b's
  initial noise is ``normal(fold_in(PRNGKey(seed), b))``, z at the grid's first timestep.
  ``init_images`` ([r, r, 3] for every prompt, or [N, r, r, 3]; in [-1, 1]) with ``strength``:
  image-to-image, the VAE posterior sampled with the 'vae_posterior' stream. ``control_images``
  (the same shapes and range, ``resolution`` times the ControlNet's pixel factor over the latents)
  with ``controlnet_scale``: the pipeline's ControlNet's condition."""
  check_generation(steps, batch_size, guidance_scale, gamma)
  unet, vae = pipeline.unet, pipeline.vae
  factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SDXL
  multiple = factor * 2 ** (len(unet.config["block_out_channels"]) - 1)
  if resolution < multiple or resolution % multiple:
    raise errors.UserError(f"resolution={resolution} is invalid; allowed: a positive multiple of "
                           f"{multiple}")
  if init_images is not None:
    init_images = _image_batch(init_images, len(prompts), resolution, 3, "init images")
  else:
    strength = 1.0
  control_images = _check_control(pipeline, control_images, len(prompts), resolution,
                                  resolution // factor)
  key = (steps, timesteps, sampler, strength, gamma)
  if key not in pipeline.generators:  # checks the grid and strength before compiling anything
    pipeline.generators[key] = make_generator(unet, vae, steps, timesteps, sampler, strength,
                                              gamma, pipeline.controlnet)
  generate = pipeline.generators[key]
  uncond, scale, extra = None, guidance_scale, {}
  cond_dim = unet.config.get("time_cond_proj_dim")
  if cond_dim:  # w enters as the UNet's guidance embedding: no unconditional branch
    if negative_prompt is not None:
      raise errors.UserError("negative_prompt is invalid for a guidance-conditioned UNet "
                             f"(time_cond_proj_dim={cond_dim}): it runs no unconditional branch; "
                             "allowed: no negative prompt")
    extra = {"timestep_cond": guidance.scale_embedding(
        np.full((batch_size,), guidance_scale - 1.0, np.float32), cond_dim)}
    scale = 1.0
  elif guidance_scale != 1.0:
    zeros = negative_prompt is None and pipeline.zeros_for_empty_prompt
    uncond = dict(sdxl_text.unconditional(pipeline.encode, zeros, negative_prompt or ""),
                  time_ids=sdxl.time_ids(resolution, 1))
  latent = resolution // factor
  params = pipeline.unet_params
  if pipeline.controlnet is not None:
    params = sdxl_controlnet.Controlled(params, pipeline.controlnet_params)
  out, started, reported = [], time.time(), time.time()
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    cond = dict(pipeline.encode(chunk + [chunk[-1]] * pad), **extra)  # fixed batch: one compile
    cond["time_ids"] = sdxl.time_ids(resolution, batch_size)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), b),
                              (batch_size, latent, latent, 4))
    rng = jax.random.fold_in(seeds.key(seed, "sampler_noise"), b)
    init = None
    if init_images is not None:
      pixels = _padded(init_images[start:start + batch_size], pad)
      eps = jax.random.normal(jax.random.fold_in(seeds.key(seed, "vae_posterior"), b),
                              noise.shape)
      init = pipeline.encode_image(pipeline.vae_params, pixels, eps)
    guide = uncond
    if control_images is not None:  # the same control image in both branches
      control = {"control": _padded(control_images[start:start + batch_size], pad),
                 "control_scale": np.full((batch_size,), controlnet_scale, np.float32)}
      cond.update(control)
      guide = uncond and dict(uncond, **control)
    images = generate(params, pipeline.vae_params, cond, noise, rng, guide, jnp.float32(scale),
                      init)
    out.append(np.asarray(images)[:len(chunk)])
    done = start + len(chunk)
    if time.time() - reported > PROGRESS_EVERY_S and done < len(prompts):
      reported = time.time()
      per_image = (reported - started) / done
      logging.info("%d / %d images (%d steps): %.2f s per image, about %.0f s left", done,
                   len(prompts), steps, per_image, per_image * (len(prompts) - done))
  return np.concatenate(out)
