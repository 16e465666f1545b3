"""Diffusion pre-training objective: v-prediction with SNR+1 weighting (SPEC section 5).

``L = (SNR(t) + 1) ||x - x_hat||^2 / d = ||v - v_hat||^2 / d`` with ``t ~ U(0, 1)``.
``multiscale_levels = k`` (images [B, H, W, C]) averages this over the full resolution and k
successive 2x2 average poolings of ``x - x_hat`` (simple diffusion's multiscale loss; MCM uses
one pooling at 128x128). ``p_uncond > 0`` replaces each label by the null label ``null_cond``
with that probability (classifier-free guidance's label dropout, Ho & Salimans 2022), so the
unconditional branch that guided sampling calls is trained.
"""
import zlib

import jax
import jax.numpy as jnp

from mcm_jax.samplers.addim import noised
from mcm_jax.schedules import alpha_sigma, snr_plus_one


def _avg_pool2(d):
  b, h, w, c = d.shape
  return d.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def drop_labels(label, rng, p_uncond, null_cond):
  """``label`` with each entry replaced by ``null_cond`` with probability ``p_uncond``."""
  return jnp.where(jax.random.bernoulli(rng, p_uncond, label.shape), null_cond, label)


def diffusion_loss(params, batch, rng, step, frozen=None, *, denoise_fn, logsnr_fn,
                   multiscale_levels=0, p_uncond=0.0, null_cond=None):
  """Pure objective ``(params, batch, rng, step) -> (loss, metrics)``.

  ``batch['x']`` is [B, ...]; ``batch.get('label')`` is passed to the model as ``cond`` (each
  replaced by ``null_cond`` with probability ``p_uncond``).
  ``denoise_fn(params, z, t, cond, rng) -> x_hat`` (see ``parameterization.make_denoiser``).
  """
  del step, frozen
  x = batch["x"]
  rng_t, rng_eps, rng_model = jax.random.split(rng, 3)
  t = jax.random.uniform(rng_t, x.shape[:1])
  eps = jax.random.normal(rng_eps, x.shape, x.dtype)
  logsnr = logsnr_fn(t)
  alpha, sigma = alpha_sigma(logsnr)
  z_t = noised(x, eps, alpha, sigma)
  cond = batch.get("label")
  if p_uncond > 0 and cond is not None:  # its own stream: p_uncond = 0 keeps the draws above
    cond = drop_labels(cond, jax.random.fold_in(rng, zlib.crc32(b"label_dropout")), p_uncond,
                       null_cond)
  x_hat = denoise_fn(params, z_t, t, cond, rng_model)
  diff = x_hat - x
  sq = [jnp.mean(jnp.square(diff).reshape(x.shape[0], -1), axis=-1)]
  for _ in range(multiscale_levels):
    diff = _avg_pool2(diff)
    sq.append(jnp.mean(jnp.square(diff).reshape(x.shape[0], -1), axis=-1))
  per_example = snr_plus_one(logsnr) * jnp.mean(jnp.stack(sq), axis=0)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss}
