"""Few-step samplers on SDXL's discrete timesteps (1000, scaled-linear betas), for MLCM LoRAs
and the LoRAs users bring from elsewhere:

- timestep grids (``timestep_grid``): MLCM's segment starts ``s T / K`` ('uniform'), diffusers'
  'trailing' and 'leading' spacings, LCMScheduler's ('lcm'), or a user's list
  (``explicit_grid``); each is K decreasing timesteps then 0;
- ``sample``: DDIM jumps between the grid's timesteps (MLCM; diffusers' Euler on the same
  timesteps), LCM's re-noising multistep sampler (``lcm_boundary``), TCD's (``tcd_sample_on_grid``),
  DPM-Solver++(2M) for many-step sampling of the base model;
- ``grid_sigmas``: a grid as the sigmas ComfyUI / k-diffusion / diffusers' Euler step through.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import schedules, sharding
from mcm_jax.errors import UserError
from mcm_jax.samplers import addim, dpm_solver
from mcm_jax.samplers.addim import bcast

T = 1000  # SDXL's training timesteps


def alpha_sigma(t, clean=None):
  """(alpha, sigma) [B] at integer timesteps t; where ``clean`` is True, (1, 0)."""
  logsnr = schedules.sdxl_logsnr(t)
  if clean is not None:
    logsnr = jnp.where(clean, jnp.inf, logsnr)
  return schedules.alpha_sigma(logsnr)


def milestones(num_segments):
  """[K + 1] integer milestones ``s T / K`` (static numpy)."""
  return (np.arange(num_segments + 1) * T // num_segments).astype(np.int32)


def sampling_timesteps(num_steps):
  """The K-step sampler's grid: the milestones from the top (capped at 999) down to 0."""
  return np.minimum(milestones(num_steps), T - 1)[::-1].copy()


SPACINGS = ("uniform", "trailing", "leading", "lcm")  # timestep grids (see ``timestep_grid``)
# DDIM jumps (MLCM) / re-noised x_hat (LCM) / TCD's gamma / DPM-Solver++(2M) and (2S) (teachers)
SAMPLERS = ("ddim", "lcm", "tcd", "dpmpp_2m", "dpmpp_2s")


def timestep_grid(num_steps, spacing="uniform", original_steps=50):
  """The K sampling timesteps (decreasing) followed by 0, the clean end (not evaluated):
  'uniform' = MLCM's segment milestones ``s T / K`` (top capped at 999: 999, 750, 500, 250);
  'trailing' = diffusers' trailing spacing ``round(T - i T / K) - 1`` (999, 749, 499, 249);
  'leading' = diffusers' leading spacing with SDXL's ``steps_offset`` 1, ``(K - 1 - i) (T // K) +
  1`` (751, 501, 251, 1; its Euler / DDIM schedulers' default);
  'lcm' = diffusers' LCMScheduler grid: K evenly spaced entries of ``(1..original_steps) T /
  original_steps - 1`` from the top (999, 759, 499, 259)."""
  if spacing == "uniform":
    return sampling_timesteps(num_steps)
  if spacing == "trailing":
    steps = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  elif spacing == "leading":
    steps = np.arange(num_steps - 1, -1, -1) * (T // num_steps) + 1
  elif spacing == "lcm":
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    if not 1 <= num_steps <= original_steps:
      raise UserError(f"num_steps={num_steps} is invalid for the 'lcm' grid; allowed: 1.."
                      f"{original_steps} (original_steps)")
    steps = origin[np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(int)]
  else:
    raise UserError(f"spacing={spacing!r} is not known; allowed: {SPACINGS}")
  return np.append(steps, 0).astype(np.int32)


def sampling_grid(steps, timesteps="uniform"):
  """The grid for ``steps`` and a ``timesteps`` option: a spacing name (``SPACINGS``) or an
  explicit comma-separated list such as '999,749,499,124' (then ``steps`` must be its length)."""
  if timesteps in SPACINGS:
    return timestep_grid(steps, timesteps)
  try:
    values = [int(v) for v in str(timesteps).split(",")]
  except ValueError as e:
    raise UserError(f"timesteps={timesteps!r} is invalid; allowed: one of {SPACINGS} or a "
                    "comma-separated list of timesteps, e.g. 999,749,499,124") from e
  if len(values) != steps:
    raise UserError(f"timesteps={timesteps!r} has {len(values)} entries but steps={steps}; "
                    "allowed: one timestep per step")
  return explicit_grid(values)


def explicit_grid(timesteps):
  """A user's timesteps (e.g. 999, 749, 499, 124) checked (integers in [1, 999], strictly
  decreasing) with the clean end appended."""
  steps = np.asarray(timesteps)
  if (steps.ndim != 1 or not len(steps) or np.any(steps != np.round(steps))
      or np.any(steps < 1) or np.any(steps > T - 1) or np.any(np.diff(steps) >= 0)):
    raise UserError(f"timesteps={list(np.asarray(timesteps).tolist())} are invalid; allowed: "
                    f"strictly decreasing integers in [1, {T - 1}], e.g. 999,749,499,124")
  return np.append(steps, 0).astype(np.int32)


def grid_sigmas(grid):
  """A grid as k-diffusion / ComfyUI / diffusers-Euler sigmas: ``sigma_t / alpha_t =
  sqrt((1 - alphabar_t) / alphabar_t)`` at each timestep, then 0 for the clean end."""
  alpha, sigma = (np.asarray(v, np.float64) for v in schedules.sdxl_alphas_sigmas())
  steps = np.asarray(grid)[:-1]
  return np.append(sigma[steps] / alpha[steps], 0.0)


def lcm_boundary(f, timestep_scaling=10.0, sigma_data=0.5):
  """LCM's consistency parameterisation around a denoiser: ``c_out(t) f(z, t) + c_skip(t) z``
  with ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)``, ``c_out = s t / sqrt((s t)^2 +
  sigma_data^2)``, s = ``timestep_scaling`` (what LCM / LCM-LoRA models are trained with)."""
  def g(z, t):
    scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / jnp.sqrt(scaled ** 2 + sigma_data ** 2)
    return bcast(c_out, z) * f(z, t) + bcast(c_skip, z) * z
  return g


def tcd_sample_on_grid(f, z_init, grid, gamma, noise):
  """TCD's multistep sampler (Zheng et al. 2024; diffusers' ``TCDScheduler``) on SDXL timesteps:
  at t_i, ``x_hat = f(z, t_i)`` and ``eps_hat = (z - alpha_i x_hat) / sigma_i``; with
  ``s = floor((1 - gamma) t_{i+1})``, ``z_s = alpha_s x_hat + sigma_s eps_hat``, then
  ``z_{t_{i+1}} = sqrt(abar_{i+1} / abar_s) z_s + sqrt(1 - abar_{i+1} / abar_s) noise[i]``.
  ``grid``: K timesteps then 0, which TCD reads as timestep 0 (abar_0), not the clean end: the
  last step returns ``z_s`` at s = 0. gamma = 0 is deterministic (DDIM to t_{i+1}); ``noise``
  [>= K - 1, B, ...] (its first K - 1 entries are used). One ``lax.scan``: ``f`` is traced once."""
  grid = np.asarray(grid)
  batch = z_init.shape[0]
  full = lambda t: jnp.full((batch,), t, jnp.float32)
  times = np.stack([grid[:-1], np.floor((1 - gamma) * grid[1:]), grid[1:]], 1)  # t_i, s, t_{i+1}
  renoise = np.arange(len(times)) < len(times) - 1  # every step but the last, when gamma > 0
  noise = addim.noise_per_step(noise, len(times), z_init)

  def step(z, xs):
    (t, s, t_next), fresh, again = xs
    x_hat = f(z, full(t))
    a_t, s_t = alpha_sigma(full(t))
    eps_hat = (z - bcast(a_t, z) * x_hat) / bcast(s_t, z)
    a_s, s_s = alpha_sigma(full(s))
    z_s = bcast(a_s, z) * x_hat + bcast(s_s, z) * eps_hat
    if gamma > 0:
      keep = (alpha_sigma(full(t_next))[0] / a_s) ** 2  # abar_{i+1} / abar_s
      z_s = jnp.where(again, bcast(jnp.sqrt(keep), z) * z_s + bcast(jnp.sqrt(1 - keep), z) * fresh,
                      z_s)
    return z_s.astype(z.dtype), z_s

  return addim.scan_steps(step, z_init, (jnp.asarray(times, jnp.float32), noise,
                                         jnp.asarray(renoise)))


DPM_SOLVER_2 = dpm_solver.SECOND_ORDER  # the singlestep second-order DPM-Solvers, by name


def dpm_solver_2_step(f, z, t, t_next, algorithm="dpmpp_2s"):
  """One singlestep second-order DPM-Solver step (``dpm_solver.second_order_step``) between
  SDXL timesteps ``t`` and ``t_next`` [B] through ``u = (t + t_next) // 2``: diffusers'
  ``DPMSolverSinglestepScheduler`` (order 2, midpoint) on the grid ``t, u, t_next``. For
  ``t_next = t - 1``, ``u = t_next`` (r = 1)."""
  return dpm_solver.second_order_step(f, z, t, (t + t_next) // 2, t_next, schedules.sdxl_logsnr,
                                      algorithm)


def with_midpoints(grid):
  """``grid`` (decreasing timesteps, then 0) with ``(t_i + t_{i+1}) // 2`` after each timestep
  but the last: the timesteps diffusers' ``DPMSolverSinglestepScheduler`` steps through for
  ``dpm_solver_2s_sample_on_grid``."""
  grid = np.asarray(grid)
  mids = (grid[:-2] + grid[1:-1]) // 2
  return np.concatenate([np.stack([grid[:-2], mids], 1).reshape(-1), grid[-2:]])


def dpm_solver_2s_sample_on_grid(f, z_init, grid):
  """DPM-Solver++(2S) over ``grid`` (K timesteps, then 0 = the clean end): a
  ``dpm_solver_2_step`` between consecutive timesteps, the last step ``x_hat`` (first order to
  sigma = 0); 2K - 1 model calls. diffusers' ``DPMSolverSinglestepScheduler`` (dpmsolver++,
  order 2) on ``with_midpoints(grid)``."""
  grid = jnp.asarray(grid, jnp.float32)
  full = lambda t: jnp.full((z_init.shape[0],), t, jnp.float32)

  def step(z, t_next):
    z = dpm_solver_2_step(f, z, full(t_next[0]), full(t_next[1]), "dpmpp_2s").astype(z.dtype)
    return z, None

  z = jax.lax.scan(step, z_init, (grid[:-2], grid[1:-1]))[0]
  return f(z, full(grid[-2]))


def sample(f, noise, steps, sampler="ddim", rng=None, gamma=0.3, unrolled=False):
  """Few-step sampling of a denoiser ``f(z, t)`` from ``noise`` (= z_999).

  ``steps``: an int K (MLCM's K segments: ``timestep_grid(K)``) or a grid from
  ``timestep_grid`` / ``explicit_grid`` (decreasing timesteps, then 0). ``sampler``: 'ddim' =
  deterministic DDIM jumps between the grid's timesteps (``addim.sample_on_grid``, what MLCM
  trains for); 'lcm' = LCM's multistep sampling as diffusers' LCMScheduler: ``lcm_boundary(f)``'s
  x_hat re-noised with fresh noise drawn from ``rng`` to the next timestep, the last x_hat
  returned (``addim.renoise_sample_on_grid``); 'tcd' = TCD's sampler with stochasticity
  ``gamma`` (``tcd_sample_on_grid``, fresh noise from ``rng``); 'dpmpp_2m' = DPM-Solver++(2M)
  (``dpm_solver.dpmpp_2m_sample_on_grid``), 'dpmpp_2s' = DPM-Solver++(2S)
  (``dpm_solver_2s_sample_on_grid``), both deterministic. ``unrolled`` ('ddim'): the steps as a
  Python loop, for gradients through a few steps (``addim.scan_steps``)."""
  grid = timestep_grid(int(steps)) if np.ndim(steps) == 0 else np.asarray(steps)
  if sampler == "ddim":
    return addim.sample_on_grid(f, noise, grid, schedules.sdxl_logsnr, unrolled=unrolled)
  if sampler == "dpmpp_2m":
    return dpm_solver.dpmpp_2m_sample_on_grid(f, noise, grid, schedules.sdxl_logsnr)
  if sampler == "dpmpp_2s":
    return dpm_solver_2s_sample_on_grid(f, noise, grid)
  if sampler not in SAMPLERS:
    raise UserError(f"sampler={sampler!r} is not known; allowed: {SAMPLERS}")
  fresh = sharding.constrain_batch(
      jax.random.normal(rng, (max(len(grid) - 2, 0),) + noise.shape, noise.dtype), axis=1)
  if sampler == "tcd":
    if not 0 <= gamma <= 1:
      raise UserError(f"gamma={gamma} is invalid; allowed: 0 <= gamma <= 1 (TCD's eta)")
    return tcd_sample_on_grid(f, noise, grid, gamma, fresh)
  return addim.renoise_sample_on_grid(lcm_boundary(f), noise, grid, schedules.sdxl_logsnr, fresh)
