"""DPM-Solver steps and samplers on any noise schedule: DPM-Solver-2 (Lu et al. 2022a) and
DPM-Solver++(2S / 2M) (Lu et al. 2022b), as diffusers' ``DPMSolverSinglestepScheduler`` /
``DPMSolverMultistepScheduler`` (order 2, midpoint) compute them.

Conventions of ``mcm_jax.samplers.addim``: a model function ``f(z, t) -> x_hat``, a schedule
``logsnr_fn(t)``, ``[B, ...]`` arrays; ``t`` is whatever the model takes (continuous t in [0, 1]
for the pixel models, integer timesteps for SDXL with ``schedules.sdxl_logsnr``).
With ``lambda = log(alpha / sigma) = logsnr / 2`` and ``h = lambda_next - lambda_t``, the
first-order step of either family is DDIM.
"""
import jax
import jax.numpy as jnp

from mcm_jax.errors import UserError
from mcm_jax.samplers.addim import bcast, ddim_step, step_times
from mcm_jax.schedules import alpha_sigma

# singlestep second-order solvers -> diffusers' algorithm_type: what the step extrapolates,
# eps (DPM-Solver-2) or the clean estimate (DPM-Solver++(2S))
SECOND_ORDER = {"dpm_solver_2": "dpmsolver", "dpmpp_2s": "dpmsolver++"}


def second_order_step(f, z, t, u, t_next, logsnr_fn, algorithm="dpmpp_2s"):
  """One singlestep second-order step from ``t`` to ``t_next`` through ``u`` (all [B]):
  ``z_u = DDIM_{t -> u}(x_t, z)``, ``x_u = f(z_u, u)``, ``r = (lambda_u - lambda_t) / h``, then
  'dpmpp_2s': ``z_next = (sigma_next / sigma_t) z - alpha_next (e^{-h} - 1) (x_t + (x_u - x_t)
  / (2 r))``; 'dpm_solver_2' the same on eps: ``z_next = (alpha_next / alpha_t) z - sigma_next
  (e^h - 1) (eps_t + (eps_u - eps_t) / (2 r))`` with ``eps = (z - alpha x) / sigma``. Two calls
  of ``f``."""
  if algorithm not in SECOND_ORDER:
    raise UserError(f"DPM-Solver step {algorithm!r} is not known; allowed: {tuple(SECOND_ORDER)}")
  l_t, l_u, l_n = logsnr_fn(t), logsnr_fn(u), logsnr_fn(t_next)
  (a_t, s_t), (a_u, s_u), (a_n, s_n) = alpha_sigma(l_t), alpha_sigma(l_u), alpha_sigma(l_n)
  h = (l_n - l_t) / 2
  r = (l_u - l_t) / (2 * h)
  x_t = f(z, t)
  z_u = ddim_step(x_t, z, a_t, s_t, a_u, s_u)
  x_u = f(z_u, u)
  if algorithm == "dpmpp_2s":
    d = x_t + bcast(0.5 / r, z) * (x_u - x_t)
    return bcast(s_n / s_t, z) * z - bcast(a_n * jnp.expm1(-h), z) * d
  eps_t = (z - bcast(a_t, z) * x_t) / bcast(s_t, z)
  eps_u = (z_u - bcast(a_u, z) * x_u) / bcast(s_u, z)
  d = eps_t + bcast(0.5 / r, z) * (eps_u - eps_t)
  return bcast(a_n / a_t, z) * z - bcast(s_n * jnp.expm1(h), z) * d


def multistep_update(x_hat, previous, z, logsnr_prev, logsnr_t, logsnr_next, first):
  """One DPM-Solver++(2M) step from t to next given ``x_hat = f(z_t, t)`` and the previous
  step's ``previous`` at ``logsnr_prev`` (unused where ``first``): ``z_next = (sigma_next /
  sigma_t) z - alpha_next (e^{-h} - 1) D``, ``D = x_hat`` where ``first``, else ``x_hat +
  (x_hat - previous) h / (2 h_prev)``."""
  (_, s_t), (a_n, s_n) = alpha_sigma(logsnr_t), alpha_sigma(logsnr_next)
  h = (logsnr_next - logsnr_t) / 2
  r = (logsnr_t - logsnr_prev) / (2 * h)
  d = jnp.where(bcast(first, z), x_hat, x_hat + bcast(0.5 / r, z) * (x_hat - previous))
  return bcast(s_n / s_t, z) * z - bcast(a_n * jnp.expm1(-h), z) * d


def dpmpp_2m_sample_on_grid(f, z_init, times, logsnr_fn):
  """DPM-Solver++(2M) (``multistep_update``) over the decreasing grid ``times`` [N + 1] whose
  last entry is the clean end (not evaluated: the last step returns ``x_hat``, the first-order
  step to sigma = 0, as diffusers' last step). One ``lax.scan``: ``f`` is traced once."""
  batch = z_init.shape[0]
  times = jnp.asarray(times, jnp.float32)
  logsnr = logsnr_fn(times[:-1])
  # Step i: (t_i, lambda_{i-1}, lambda_i, lambda_{i+1}); the last step's update is discarded,
  # so its lambda_{i+1} is lambda_i (a finite no-op step instead of the clean end's).
  steps = (times[:-1], jnp.concatenate([logsnr[:1], logsnr[:-1]]), logsnr,
           jnp.concatenate([logsnr[1:], logsnr[-1:]]), jnp.arange(times.shape[0] - 1) == 0)

  def step(carry, xs):
    z, previous = carry
    t, l_prev, l_t, l_next, first = xs
    full = lambda v: jnp.full((batch,), v)
    x_hat = f(z, full(t)).astype(z.dtype)
    z_next = multistep_update(x_hat, previous, z, full(l_prev), full(l_t), full(l_next), first)
    return (z_next.astype(z.dtype), x_hat), None

  return jax.lax.scan(step, (z_init, z_init), steps)[0][1]  # the last x_hat


def dpmpp_2m_sample(f, z_init, num_steps, logsnr_fn):
  """DPM-Solver++(2M) over ``num_steps`` equal steps in t from 1 to 0 (the last returns
  ``x_hat``), in a ``fori_loop``: ``num_steps`` may be traced, and many steps compile once."""
  batch = z_init.shape[0]

  def step(i, carry):
    z, previous = carry
    t, s = step_times(i, num_steps, batch)
    x_hat = f(z, t)
    t_prev = t + 1.0 / jnp.asarray(num_steps, jnp.float32)
    z_next = multistep_update(x_hat, previous, z, logsnr_fn(t_prev), logsnr_fn(t), logsnr_fn(s),
                              i == 0)
    return jnp.where(i == num_steps - 1, x_hat, z_next), x_hat

  return jax.lax.fori_loop(0, num_steps, step, (z_init, z_init))[0]
