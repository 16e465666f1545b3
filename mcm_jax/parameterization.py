"""The one place where model outputs (v / eps / x) are converted to a data estimate x_hat.

``v = alpha eps - sigma x``; hence ``x = alpha z - sigma v`` and ``eps = sigma z + alpha v``.
For an epsilon model ``x = (z - sigma eps) / alpha``.
"""
import jax.numpy as jnp

from mcm_jax.errors import UserError
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
  raise UserError(f"prediction={prediction!r} is not known; allowed: {PREDICTIONS}")


TIME_INPUTS = ("logsnr", "t")


def make_denoiser(apply_fn, logsnr_fn, prediction="v", time_input="logsnr"):
  """Wraps a network ``apply_fn(params, z, time, cond, rng) -> out`` into the denoiser
  ``f(params, z, t, cond=None, rng=None) -> x_hat`` that objectives and samplers use.

  ``time_input``: what the network is conditioned on, 'logsnr' (UViT, MLP) or the schedule's
  own time 't' (SDXL's UNet takes the integer timestep)."""
  if prediction not in PREDICTIONS:
    raise UserError(f"prediction={prediction!r} is not known; allowed: {PREDICTIONS}")
  if time_input not in TIME_INPUTS:
    raise UserError(f"time_input={time_input!r} is not known; allowed: {TIME_INPUTS}")

  def denoise(params, z, t, cond=None, rng=None):
    t = jnp.asarray(t, jnp.float32)
    logsnr = logsnr_fn(t)
    alpha, sigma = alpha_sigma(logsnr)
    out = apply_fn(params, z, logsnr if time_input == "logsnr" else t, cond, rng)
    return x_from_prediction(prediction, out.astype(jnp.float32), z, alpha, sigma)

  return denoise
