"""The one place where model outputs (v / eps / x) are converted to a data estimate x_hat.

``v = alpha eps - sigma x``; hence ``x = alpha z - sigma v`` and ``eps = sigma z + alpha v``.
For an epsilon model ``x = (z - sigma eps) / alpha``.
"""
import jax.numpy as jnp

from mcm_jax.samplers.addim import bcast
from mcm_jax.schedules import alpha_sigma

PREDICTIONS = ("v", "eps", "x")


def x_from_prediction(prediction, out, z, alpha, sigma):
  """x_hat from the network output ``out`` of kind ``prediction`` (one of PREDICTIONS)."""
  alpha, sigma = bcast(alpha, z), bcast(sigma, z)
  if prediction == "v":
    return alpha * z - sigma * out
  if prediction == "eps":
    return (z - sigma * out) / alpha
  if prediction == "x":
    return out
  raise ValueError(f"prediction={prediction!r} is not known; allowed: {PREDICTIONS}")


def make_denoiser(apply_fn, logsnr_fn, prediction="v"):
  """Wraps a network ``apply_fn(params, z, logsnr, cond, rng) -> out`` into the denoiser
  ``f(params, z, t, cond=None, rng=None) -> x_hat`` that objectives and samplers use."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r} is not known; allowed: {PREDICTIONS}")

  def denoise(params, z, t, cond=None, rng=None):
    logsnr = logsnr_fn(jnp.asarray(t, jnp.float32))
    alpha, sigma = alpha_sigma(logsnr)
    out = apply_fn(params, z, logsnr, cond, rng)
    return x_from_prediction(prediction, out.astype(jnp.float32), z, alpha, sigma)

  return denoise
