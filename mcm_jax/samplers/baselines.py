"""Baseline samplers to compare aDDIM against: stochastic "noise DDIM" (MCM App. A.4),
ancestral (DDPM) sampling and EDM's Heun.

Same conventions as ``mcm_jax.samplers.addim``: a model function ``f(z, t) -> x_hat``,
a schedule ``logsnr_fn(t)``, ``[B, ...]`` arrays; uniform steps in t from 1 to 0, the last
step returns ``x_hat``.
"""
import jax
import jax.numpy as jnp

from mcm_jax.samplers.addim import analytic_x_var_fn, bcast, ddim_step, step_times
from mcm_jax.schedules import alpha_sigma


def noise_ddim_sample(f, z_init, num_steps, logsnr_fn, rng, x_var_fn=analytic_x_var_fn):
  """"Noise DDIM" as MCM App. A.4 / Fig. 5 describe it: DDIM with random Gaussian noise added
  directly to the model prediction, ``x_tilde = x_hat + sqrt(x_var) xi``, ``xi ~ N(0, I)``,
  then ``z_s = DDIM_{t->s}(x_tilde, z_t)``; the last step returns ``x_hat``. ``x_var`` per
  dimension from ``x_var_fn(t, alpha_t, sigma_t)`` (default MCM's analytic ``0.1 / (2 + SNR)``;
  ``addim.table_x_var`` for one measured on data). One step adds
  ``(alpha_s - alpha_t sigma_s / sigma_t)^2 x_var`` of variance to ``z_s``: the variance aDDIM
  puts back deterministically (its ``zs_var``), here injected as noise.
  """
  batch = z_init.shape[0]

  def step(i, z):
    t, s = step_times(i, num_steps, batch)
    x_hat = f(z, t)
    a_t, s_t = alpha_sigma(logsnr_fn(t))
    a_s, s_s = alpha_sigma(logsnr_fn(s))
    xi = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
    x_tilde = x_hat + bcast(jnp.sqrt(x_var_fn(t, a_t, s_t)), z) * xi
    return jnp.where(i == num_steps - 1, x_hat, ddim_step(x_tilde, z, a_t, s_t, a_s, s_s))

  return jax.lax.fori_loop(0, num_steps, step, z_init)


def ancestral_sample(f, z_init, num_steps, logsnr_fn, rng):
  """Ancestral (DDPM / DDIM eta=1) sampling: ``z_s ~ q(z_s | z_t, x = x_hat)``.

  With ``alpha_ts = alpha_t / alpha_s`` and ``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``:
  mean ``= alpha_ts sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_ts^2 / sigma_t^2 x_hat``,
  variance ``= sigma_ts^2 sigma_s^2 / sigma_t^2``.
  """
  batch = z_init.shape[0]

  def step(i, z):
    t, s = step_times(i, num_steps, batch)
    x_hat = f(z, t)
    a_t, s_t = (bcast(v, z) for v in alpha_sigma(logsnr_fn(t)))
    a_s, s_s = (bcast(v, z) for v in alpha_sigma(logsnr_fn(s)))
    a_ts = a_t / a_s
    var_ts = jnp.maximum(s_t ** 2 - a_ts ** 2 * s_s ** 2, 0.0)
    mean = a_ts * s_s ** 2 / s_t ** 2 * z + a_s * var_ts / s_t ** 2 * x_hat
    std = jnp.sqrt(var_ts * s_s ** 2 / s_t ** 2)
    noise = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
    return jnp.where(i == num_steps - 1, x_hat, mean + std * noise)

  return jax.lax.fori_loop(0, num_steps, step, z_init)


def heun_sample(f, z_init, num_steps, logsnr_fn):
  """EDM's 2nd-order Heun sampler on the probability-flow ODE in ``y = z / alpha``,
  ``tau = sigma / alpha`` coordinates, where ``dy / dtau = eps_hat`` and an Euler step is DDIM.

  Two model calls per step except the last (Euler, returning x_hat): 2N - 1 evaluations.
  """
  batch = z_init.shape[0]

  def eps_of(z, t):
    a, s = (bcast(v, z) for v in alpha_sigma(logsnr_fn(t)))
    x_hat = f(z, t)
    return (z - a * x_hat) / s, x_hat, a, s

  def step(i, z):
    t, s = step_times(i, num_steps, batch)
    eps_t, x_hat, a_t, s_t = eps_of(z, t)
    a_s, s_s = (bcast(v, z) for v in alpha_sigma(logsnr_fn(s)))
    y_t, tau_t, tau_s = z / a_t, s_t / a_t, s_s / a_s
    y_euler = y_t + (tau_s - tau_t) * eps_t

    def heun(_):
      eps_s, _, _, _ = eps_of(a_s * y_euler, s)
      return a_s * (y_t + (tau_s - tau_t) * 0.5 * (eps_t + eps_s))

    last = i == num_steps - 1
    return jax.lax.cond(last, lambda _: x_hat, heun, None)

  return jax.lax.fori_loop(0, num_steps, step, z_init)
