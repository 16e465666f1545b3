"""Variance-preserving noise schedules (SPEC section 1).

``z_t = alpha_t x + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1`` and ``t in [0, 1]``
(t=0 data, t=1 noise). Every schedule is a pure function ``t -> logsnr`` with
``logsnr = log(alpha^2 / sigma^2)``; ``alpha_sigma`` turns a logsnr into (alpha, sigma).
Only jax / numpy are imported here so other JAX code can use this module directly.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import UserError


def alpha_sigma(logsnr):
  """``alpha = sqrt(sigmoid(logsnr))``, ``sigma = sqrt(sigmoid(-logsnr))``."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def cosine_logsnr(t, logsnr_min=-15.0, logsnr_max=15.0):
  """``logsnr(t) = -2 log tan(pi t' / 2)`` with t remapped so logsnr stays in [min, max].

  ``t' = t_min + t (t_max - t_min)``, ``t_min = 2/pi atan(exp(-logsnr_max / 2))``,
  ``t_max = 2/pi atan(exp(-logsnr_min / 2))``: logsnr(0) = logsnr_max, logsnr(1) = logsnr_min.
  """
  t = jnp.asarray(t, jnp.float32)
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * t + b))


def shifted_cosine_logsnr(t, image_res, noise_res, logsnr_min=-15.0, logsnr_max=15.0,
                          clip_after_shift=False):
  """Simple diffusion's shifted cosine: ``cosine(t) + 2 log(noise_res / image_res)``, the cosine
  clipped to [logsnr_min, logsnr_max] and then shifted, so the range moves with the shift (e.g.
  64 / 32: logsnr(0) = 15 + 2 log(1/2) = 13.61). ``clip_after_shift=True`` keeps the shifted
  schedule inside [logsnr_min, logsnr_max] instead (this project's default before 2026-11-24).
  """
  shift = 2.0 * np.log(noise_res / image_res)
  if clip_after_shift:
    return cosine_logsnr(t, logsnr_min - shift, logsnr_max - shift) + shift
  return cosine_logsnr(t, logsnr_min, logsnr_max) + shift


def interpolated_cosine_logsnr(t, image_res, noise_res_low, noise_res_high,
                               logsnr_min=-15.0, logsnr_max=15.0, clip_after_shift=False):
  """``t * shifted(t; noise_res_low) + (1 - t) * shifted(t; noise_res_high)``.

  ImageNet64: noise_res_low=32, noise_res_high=64; ImageNet128: 32 -> 128.
  """
  t = jnp.asarray(t, jnp.float32)
  low = shifted_cosine_logsnr(t, image_res, noise_res_low, logsnr_min, logsnr_max,
                              clip_after_shift)
  high = shifted_cosine_logsnr(t, image_res, noise_res_high, logsnr_min, logsnr_max,
                               clip_after_shift)
  return t * low + (1.0 - t) * high


def sdxl_alphas_sigmas(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
  """SDXL / Stable Diffusion discrete "scaled linear" schedule.

  ``beta_i = (sqrt(beta_start) + i / 999 (sqrt(beta_end) - sqrt(beta_start)))^2``,
  ``alphabar_i = prod_{j<=i} (1 - beta_j)``, ``alpha_i = sqrt(alphabar_i)``,
  ``sigma_i = sqrt(1 - alphabar_i)``. Indexed by the timestep i in {0..999}
  (a caller mapping to continuous time uses ``t = (i + 1) / 1000``). Computed in float64
  with numpy, returned as float32 arrays of shape [num_train_timesteps].
  """
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                      dtype=np.float64) ** 2
  alphabar = np.cumprod(1.0 - betas)
  return (jnp.asarray(np.sqrt(alphabar), jnp.float32),
          jnp.asarray(np.sqrt(1.0 - alphabar), jnp.float32))


def sdxl_logsnr(timesteps, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012):
  """logsnr at integer timesteps of SDXL's discrete schedule (``sdxl_alphas_sigmas``):
  ``log(alphabar_i / (1 - alphabar_i))`` for ``i = clip(round(timesteps), 0, T - 1)``.

  This is the ``logsnr_fn`` that the shared samplers and ``parameterization`` consume for
  SDXL; its time axis is the integer timestep, 999 the noisiest. The clean end (alpha = 1,
  sigma = 0) is logsnr = +inf, which ``alpha_sigma`` maps exactly.
  """
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                      dtype=np.float64) ** 2
  alphabar = np.cumprod(1.0 - betas)
  table = jnp.asarray(np.log(alphabar) - np.log1p(-alphabar), jnp.float32)
  idx = jnp.clip(jnp.round(jnp.asarray(timesteps, jnp.float32)), 0, num_train_timesteps - 1)
  return table[idx.astype(jnp.int32)]


def snr_plus_one(logsnr):
  """Loss weight ``w = SNR + 1`` (v-loss weighting)."""
  return jnp.exp(logsnr) + 1.0


SCHEDULES = ("cosine", "shifted_cosine", "interpolated_cosine")


def get_logsnr_fn(name, *, image_res=None, noise_res=None, noise_res_low=None,
                  noise_res_high=None, logsnr_min=-15.0, logsnr_max=15.0,
                  clip_after_shift=False):
  """Returns ``t -> logsnr`` for a schedule named in a config (see SCHEDULES)."""
  if name == "cosine":
    return lambda t: cosine_logsnr(t, logsnr_min, logsnr_max)
  if name == "shifted_cosine":
    return lambda t: shifted_cosine_logsnr(t, image_res, noise_res, logsnr_min, logsnr_max,
                                           clip_after_shift)
  if name == "interpolated_cosine":
    return lambda t: interpolated_cosine_logsnr(
        t, image_res, noise_res_low, noise_res_high, logsnr_min, logsnr_max, clip_after_shift)
  raise UserError(f"schedule={name!r} is not known; allowed: {SCHEDULES}")
