"""Multistep consistency training (CT) and distillation (CD): MCM Algorithm 1 (SPEC section 4).

Pure functions. The objective ``consistency_loss(params, batch, rng, step, teacher_params)``
returns ``(loss, metrics)`` and knows nothing of optimizers, sharding or I/O.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import guidance
from mcm_jax.samplers.addim import addim_step, ddim_step, inv_ddim, noised
from mcm_jax.schedules import alpha_sigma, snr_plus_one

TEACHER_SAMPLERS = ("addim", "ddim")

# w(t) of the loss. Alg. 1 writes w = SNR + 1 ("v-loss weighting"); that equivalence holds for a
# squared distance. With the paper's unsquared (pseudo-Huber ~ l2) distance the v-space distance
# is ||v_hat - v_target|| = sqrt(SNR + 1) ||x_hat - x_target||, offered as an option.
LOSS_WEIGHTS = {
    "snr_plus_one": snr_plus_one,
    "sqrt_snr_plus_one": lambda logsnr: jnp.sqrt(snr_plus_one(logsnr)),
}


def teacher_steps(i, start=64, end=1280, horizon=100_000):
  """Annealed teacher steps: ``exp(log start + clip(i / horizon, 0, 1) (log end - log start))``."""
  frac = jnp.clip(jnp.asarray(i, jnp.float32) / horizon, 0.0, 1.0)
  return jnp.exp(np.log(start) + frac * (np.log(end) - np.log(start)))


def pseudo_huber(d, eps):
  """Per example ``sqrt(||d||^2 / dim + eps^2) - eps`` over all but the leading axis."""
  d = d.reshape(d.shape[0], -1)
  return jnp.sqrt(jnp.mean(jnp.square(d), axis=-1) + eps ** 2) - eps


def sample_times(rng, batch_size, student_steps, n_teacher):
  """Discrete times of Alg. 1 for one batch.

  ``n_seg = max(round(n_teacher / student_steps), 1)``, ``T = n_seg student_steps``,
  ``step ~ U{0..student_steps-1}``, ``n_rel ~ U{1..n_seg}``, ``t_step = step / student_steps``,
  ``t = t_step + n_rel / T``, ``s = t - 1 / T``. Returns (t, s, t_step), each [batch_size].
  """
  n_seg = jnp.maximum(jnp.round(n_teacher / student_steps), 1.0)
  total = n_seg * student_steps
  rng_step, rng_rel = jax.random.split(rng)
  step = jax.random.randint(rng_step, (batch_size,), 0, student_steps)
  n_rel = jax.random.randint(rng_rel, (batch_size,), 1, n_seg.astype(jnp.int32) + 1)
  t_step = step / student_steps
  t = t_step + n_rel / total
  return t, t - 1.0 / total, t_step


def segment_position(t, student_steps, tol=1e-4):
  """Where ``t`` lies in its student segment ``(t_step, t_step + 1/S]``: ``u = t S - k`` in
  (0, 1], with ``k = t_step S = ceil(t S) - 1``. The segment's upper end belongs to it (Alg. 2
  evaluates the student at ``t = t_step + 1/S``; Alg. 1's ``t`` reaches it with n_rel = n_seg),
  so ``u`` jumps from 1 to ~0 across a boundary, where the student's target jumps. ``tol``
  (in units of 1/S) absorbs the rounding of ``t_step + n_rel / T``; the finest training grid
  is 1/1280 of a segment or coarser."""
  ts = jnp.asarray(t, jnp.float32) * student_steps
  return ts - (jnp.ceil(ts - tol) - 1.0)


def consistency_target(x_ref, z_s, z_t, t, s, t_step, logsnr_fn):
  """``x_target = invDDIM_{t->t_step}(DDIM_{s->t_step}(x_ref, z_s), z_t)`` (Alg. 1 / eq. 7)."""
  a_t, s_t = alpha_sigma(logsnr_fn(t))
  a_s, s_s = alpha_sigma(logsnr_fn(s))
  a_step, s_step = alpha_sigma(logsnr_fn(t_step))
  z_ref = ddim_step(x_ref, z_s, a_s, s_s, a_step, s_step)
  return inv_ddim(z_ref, z_t, a_t, s_t, a_step, s_step)


def consistency_loss_per_example(student_fn, z_t, x_teacher, x_var, t, s, t_step,
                                 logsnr_fn, huber_eps, loss_weight="snr_plus_one"):
  """Alg. 1 for given noisy inputs and times; ``student_fn(z, t) -> x_hat``.

  ``z_s = aDDIM_{t->s}(x_teacher, z_t, x_var)``, ``x_ref = sg(f(z_s, s))``; returns the [B]
  losses ``w(t) pseudo_huber(f(z_t, t) - x_target)``, w from LOSS_WEIGHTS (default SNR + 1).
  """
  logsnr_t = logsnr_fn(t)
  a_t, s_t = alpha_sigma(logsnr_t)
  a_s, s_s = alpha_sigma(logsnr_fn(s))
  z_s = addim_step(x_teacher, z_t, a_t, s_t, a_s, s_s, x_var)
  x_ref = jax.lax.stop_gradient(student_fn(z_s, s))
  x_target = jax.lax.stop_gradient(consistency_target(x_ref, z_s, z_t, t, s, t_step, logsnr_fn))
  x_hat = student_fn(z_t, t)
  return LOSS_WEIGHTS[loss_weight](logsnr_t) * pseudo_huber(x_hat - x_target, huber_eps)


def consistency_loss(params, batch, rng, step, teacher_params=None, *, denoise_fn, logsnr_fn,
                     student_steps, teacher_fn=None, teacher_sampler="addim",
                     teacher_steps_start=64, teacher_steps_end=1280,
                     teacher_steps_horizon=100_000, xvar_frac=0.75, huber_eps=1e-4,
                     guidance_scale=1.0, null_cond=None, loss_weight="snr_plus_one"):
  """MCM Algorithm 1: CT when ``teacher_fn`` is None, CD otherwise.

  ``denoise_fn(params, z, t, cond, rng) -> x_hat`` is the student (and ``teacher_fn`` the
  teacher, called with ``teacher_params``; classifier-free guided by ``guidance.guided`` with the
  label ``null_cond`` as the unconditional input when ``guidance_scale != 1``). The student's two calls share one dropout rng
  (synchronised dropout). CD with ``teacher_sampler='addim'`` uses
  ``x_var = xvar_frac ||x_teacher_cond - x||^2 / d`` per example; 'ddim' and CT use 0.
  """
  x = batch["x"]
  cond = batch.get("label")
  rng_t, rng_eps, rng_model = jax.random.split(rng, 3)
  n_teacher = teacher_steps(step, teacher_steps_start, teacher_steps_end, teacher_steps_horizon)
  t, s, t_step = sample_times(rng_t, x.shape[0], student_steps, n_teacher)
  eps = jax.random.normal(rng_eps, x.shape, x.dtype)
  a_t, s_t = alpha_sigma(logsnr_fn(t))
  z_t = noised(x, eps, a_t, s_t)

  if teacher_fn is None:
    x_teacher, x_var = x, jnp.zeros(x.shape[:1], x.dtype)
  else:
    uncond = None if cond is None else jnp.full_like(cond, null_cond)
    x_teacher, x_cond = guidance.guided(
        lambda z, tt, c: teacher_fn(teacher_params, z, tt, c, None), z_t, t, cond, uncond,
        guidance_scale)
    x_teacher = jax.lax.stop_gradient(x_teacher)
    if teacher_sampler == "addim":
      x_var = xvar_frac * jnp.mean(jnp.square(x_cond - x).reshape(x.shape[0], -1), axis=-1)
      x_var = jax.lax.stop_gradient(x_var)
    else:
      x_var = jnp.zeros(x.shape[:1], x.dtype)

  student = lambda z, tt: denoise_fn(params, z, tt, cond, rng_model)
  per_example = consistency_loss_per_example(student, z_t, x_teacher, x_var, t, s, t_step,
                                             logsnr_fn, huber_eps, loss_weight)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss, "teacher_steps": n_teacher}
