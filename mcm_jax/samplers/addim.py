"""DDIM, inverse DDIM and adjusted DDIM (aDDIM) steps and samplers (MCM eqs. 4, 5, 14; Alg. 2, 3).

Conventions, so any JAX code can call these:
- ``x``, ``z_t``, ``z_s`` are ``[B, ...]`` arrays of any rank.
- ``alpha_*``/``sigma_*`` are scalars or ``[B]`` arrays; they broadcast over the trailing dims.
- ``x_var`` is a scalar or ``[B]``: the per-dimension posterior variance ``tr(Var[x|z_t]) / d``.
- A model function is ``f(z, t) -> x_hat`` with ``t`` a ``[B]`` array in [0, 1].
- A schedule is ``logsnr_fn(t) -> logsnr`` (see ``mcm_jax.schedules``).
Everything works under ``jit``, ``vmap`` and ``grad``; only jax (and ``schedules``) is imported.
"""
import jax
import jax.numpy as jnp

from mcm_jax.schedules import alpha_sigma


def bcast(a, x):
  """Reshapes a scalar or [B] array so it broadcasts against x of shape [B, ...]."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def noised(x, eps, alpha, sigma):
  """The forward process ``z = alpha x + sigma eps`` (``alpha``, ``sigma``: scalars or [B])."""
  return bcast(alpha, x) * x + bcast(sigma, x) * eps


def step_times(i, num_steps, batch):
  """Times of step i (0-based) of a uniform N-step sampler: ``t = (N - i) / N``, ``s = t - 1/N``,
  each a [batch] array."""
  n = jnp.asarray(num_steps, jnp.float32)
  return jnp.full((batch,), (n - i) / n), jnp.full((batch,), (n - i - 1) / n)


def ddim_step(x, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """DDIM_{t->s}: ``z_s = alpha_s x + (sigma_s / sigma_t) (z_t - alpha_t x)``."""
  a_t, s_t, a_s, s_s = (bcast(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
  return a_s * x + (s_s / s_t) * (z_t - a_t * x)


def inv_ddim(z_s, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """The x with DDIM_{t->s}(x, z_t) = z_s:
  ``x = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - alpha_t sigma_s / sigma_t)``."""
  a_t, s_t, a_s, s_s = (bcast(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
  return (z_s - (s_s / s_t) * z_t) / (a_s - a_t * s_s / s_t)


def addim_step(x, z_t, alpha_t, sigma_t, alpha_s, sigma_s, x_var):
  """Adjusted DDIM_{t->s} (MCM eq. 14, Alg. 3).

  ``eps = (z_t - alpha_t x) / sigma_t``,
  ``zs_var = (alpha_s - alpha_t sigma_s / sigma_t)^2 x_var``,
  ``z_s = alpha_s x + sqrt(sigma_s^2 + d zs_var / ||eps||^2) eps`` with d the dims per example.
  Equals ``ddim_step`` when ``x_var == 0``.
  """
  a_t, s_t, a_s, s_s = (bcast(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
  eps = (z_t - a_t * x) / s_t
  zs_var = (a_s - a_t * s_s / s_t) ** 2 * bcast(x_var, z_t)
  reduce_axes = tuple(range(1, z_t.ndim))
  dims = z_t[0].size
  eps_sq = jnp.sum(jnp.square(eps), axis=reduce_axes, keepdims=True)
  # Guard against ||eps|| = 0 (the factor is then irrelevant because eps is 0).
  scale = jnp.sqrt(s_s ** 2 + dims * zs_var / jnp.maximum(eps_sq, 1e-20))
  return a_s * x + scale * eps


def analytic_x_var(alpha_t, sigma_t):
  """MCM's analytic posterior variance per dimension: ``0.1 / (2 + alpha_t^2 / sigma_t^2)``."""
  return 0.1 / (2.0 + jnp.square(alpha_t) / jnp.square(sigma_t))


def table_x_var(table_t, table_x_var_values):
  """An x_var source from a precomputed table (SPEC 2b): linear interpolation in t.

  Returns ``x_var_fn(t, alpha_t, sigma_t) -> x_var`` usable by ``sample``.
  """
  table_t = jnp.asarray(table_t, jnp.float32)
  values = jnp.asarray(table_x_var_values, jnp.float32)
  return lambda t, alpha_t, sigma_t: jnp.interp(t, table_t, values)


def analytic_x_var_fn(t, alpha_t, sigma_t):
  """``analytic_x_var`` in the x_var_fn(t, alpha_t, sigma_t) form taken by ``sample``."""
  del t
  return analytic_x_var(alpha_t, sigma_t)


def estimate_x_var_table(f, x_data, logsnr_fn, rng, num_t=64, eta=0.75):
  """Precomputes ``x_var(t) = eta mean ||x - x_hat(z_t)||^2 / d`` on a grid of t (Alg. 3).

  ``x_data`` is a [N, ...] batch of data; returns (t_grid [num_t], x_var [num_t]) to pass to
  ``table_x_var``. The grid is uniform in (0, 1].
  """
  t_grid = jnp.linspace(1.0 / num_t, 1.0, num_t)
  reduce_axes = tuple(range(1, x_data.ndim))

  def one(t, key):
    eps = jax.random.normal(key, x_data.shape, x_data.dtype)
    tb = jnp.full((x_data.shape[0],), t)
    alpha, sigma = alpha_sigma(logsnr_fn(tb))
    z = noised(x_data, eps, alpha, sigma)
    err = jnp.mean(jnp.square(x_data - f(z, tb)), axis=reduce_axes)
    return eta * jnp.mean(err)

  keys = jax.random.split(rng, num_t)
  return t_grid, jax.lax.map(lambda a: one(*a), (t_grid, keys))


def _update(f, z, t, s, logsnr_fn, x_var_fn):
  """(x_hat, z_s): ``x_hat = f(z_t, t)``, then DDIM (x_var_fn None) or aDDIM to s."""
  x_hat = f(z, t)
  alpha_t, sigma_t = alpha_sigma(logsnr_fn(t))
  alpha_s, sigma_s = alpha_sigma(logsnr_fn(s))
  if x_var_fn is None:
    return x_hat, ddim_step(x_hat, z, alpha_t, sigma_t, alpha_s, sigma_s)
  return x_hat, addim_step(x_hat, z, alpha_t, sigma_t, alpha_s, sigma_s,
                           x_var_fn(t, alpha_t, sigma_t))


def sample(f, z_init, num_steps, logsnr_fn, x_var_fn=None, return_trajectory=False):
  """Deterministic few-/many-step sampler: DDIM (x_var_fn=None) or aDDIM (MCM Alg. 2 / 3).

  For ``t = 1, (N-1)/N, ..., 1/N`` and ``s = t - 1/N``: ``x_hat = f(z_t, t)``, then
  ``z_s = aDDIM_{t->s}(x_hat, z_t, x_var_fn(t))`` (DDIM if x_var_fn is None); the final step
  returns ``x_hat``. With a multistep consistency model as ``f`` and ``num_steps`` equal to its
  student steps this is MCM Algorithm 2.

  ``num_steps`` may be a Python int or a traced int (one compile for any step count);
  ``return_trajectory`` needs a Python int and also returns ``[num_steps + 1, B, ...]``
  states z_1, ..., z_{1/N}, x_hat.
  """
  batch = z_init.shape[0]

  def step(i, z):
    t, s = step_times(i, num_steps, batch)
    x_hat, z_s = _update(f, z, t, s, logsnr_fn, x_var_fn)
    return jnp.where(i == num_steps - 1, x_hat, z_s)

  if not return_trajectory:
    return jax.lax.fori_loop(0, num_steps, step, z_init)

  def scan_body(z, i):
    z_next = step(i, z)
    return z_next, z_next

  x, traj = jax.lax.scan(scan_body, z_init, jnp.arange(num_steps))
  return x, jnp.concatenate([z_init[None], traj], axis=0)


def sample_on_grid(f, z_init, times, logsnr_fn, x_var_fn=None, unrolled=False):
  """``sample`` over an explicit decreasing time grid ``times`` = [t_0, ..., t_N] (a list or a
  [N + 1] array): step i maps ``z_{t_i}`` to ``z_{t_{i+1}}`` by DDIM / aDDIM with
  ``x_hat = f(z_{t_i}, t_i)``; the last step returns ``x_hat`` (t_N, the clean end, is not
  evaluated). E.g. SDXL timesteps ``[999, 750, 500, 250, 0]`` with ``schedules.sdxl_logsnr``.
  The steps run in a ``lax.scan``: ``f`` is traced once for any N (``unrolled``: see
  ``scan_steps``)."""
  times = jnp.asarray(times, jnp.float32)
  batch = z_init.shape[0]

  def step(z, t_s):
    t, s = jnp.full((batch,), t_s[0]), jnp.full((batch,), t_s[1])
    x_hat, z_s = _update(f, z, t, s, logsnr_fn, x_var_fn)
    return z_s.astype(z.dtype), x_hat

  return scan_steps(step, z_init, (times[:-1], times[1:]), unrolled)


def renoise_sample_on_grid(f, z_init, times, logsnr_fn, noise):
  """Multistep consistency sampling with fresh noise (Song et al. 2023 Alg. 1; LCM's
  multistep sampler): for each t_i of the decreasing grid ``times`` [N + 1],
  ``x_hat = f(z_{t_i}, t_i)``, then ``z_{t_{i+1}} = alpha x_hat + sigma noise[i]`` with the
  given fresh Gaussian ``noise`` [>= N - 1, B, ...]; returns the last ``x_hat`` (t_N unused).
  One ``lax.scan``: ``f`` is traced once."""
  times = jnp.asarray(times, jnp.float32)
  batch = z_init.shape[0]
  noise = noise_per_step(noise, times.shape[0] - 1, z_init)

  def step(z, xs):
    t, t_next, fresh = xs
    x_hat = f(z, jnp.full((batch,), t))
    alpha, sigma = alpha_sigma(logsnr_fn(jnp.full((batch,), t_next)))
    return noised(x_hat, fresh, alpha, sigma).astype(z.dtype), x_hat

  return scan_steps(step, z_init, (times[:-1], times[1:], noise))


def scan_steps(step, z_init, xs, unrolled=False):
  """Runs ``step(z, x_i) -> (z_next, out)`` over the leading axis of ``xs`` in one
  ``lax.scan`` (the model inside ``step`` is traced once) and returns the last step's ``out``
  (e.g. ``x_hat``; in ``z_init``'s dtype); the last ``z_next`` is discarded. ``unrolled``: a
  Python loop instead (the model traced per step), for gradients through a few steps: a
  differentiated ``lax.scan`` keeps the model's step-invariant values (e.g. its weights cast
  to the compute dtype) as stacked residuals."""
  def body(carry, x):
    z, out = step(carry[0], x)
    return (z, out.astype(z_init.dtype)), None

  if not unrolled:
    return jax.lax.scan(body, (z_init, jnp.zeros_like(z_init)), xs)[0][1]
  carry = (z_init, jnp.zeros_like(z_init))
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    carry, _ = body(carry, jax.tree.map(lambda x, i=i: x[i], xs))
  return carry[1]


def noise_per_step(noise, num_steps, z_init):
  """Fresh noise for a re-noising sampler's ``scan_steps``: the first ``num_steps - 1`` entries
  of ``noise`` [>= N - 1, B, ...], then zeros for the last step, which does not re-noise."""
  return jnp.concatenate([noise[:num_steps - 1], jnp.zeros((1,) + z_init.shape, noise.dtype)])


def consistency_sample(f, z_init, student_steps, logsnr_fn, return_trajectory=False):
  """Multistep consistency sampling (MCM Alg. 2): DDIM over ``student_steps`` equal steps."""
  return sample(f, z_init, student_steps, logsnr_fn, None, return_trajectory)
