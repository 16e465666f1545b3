"""MLCM (multistep latent consistency distillation, MLCM eq. 7-8 and App. A.3) as pure functions
on the SDXL discrete schedule (timesteps 0..999, ``alphabar`` of the scaled-linear betas).

Models are epsilon predictors ``eps(z, t, cond)`` (z NHWC latents, t [B] timesteps). With
``x_hat = (z_t - sigma_t eps) / alpha_t`` the DDIM map is ``DDIM(z_t, eps, t -> s) =
alpha_s x_hat + sigma_s eps``.

Segments: K milestones ``t_step^s = s T / K`` (T = 1000); segment s holds timesteps
``(t_step^s, t_step^{s+1}]`` (the top one capped at 999) and its endpoint is ``t_step^s``, the
clean latent for s = 0 (alpha = 1, sigma = 0). Loss for one example: s ~ U{0..K-1},
``t_m ~ U(segment s)``, ``t_n = max(t_m - k, t_step^s)``,
``z_{t_n} = DDIM(z_{t_m}, teacher_eps(z_{t_m}), t_m -> t_n)`` (guided teacher, eq. 8), and
``L = mean || DDIM(z_{t_m}, f(z_{t_m}), t_m -> t_step^s)
          - sg(DDIM(z_{t_n}, f(z_{t_n}), t_n -> t_step^s)) ||^2``.
If ``t_n`` reaches the segment start the target is ``z_{t_n}`` itself (the boundary condition).
"""
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import consistency, schedules
from mcm_jax.samplers import addim
from mcm_jax.samplers.addim import bcast

T = 1000
IMAGE_FREE = ("mdi", "sdi", "progressive")  # App. Alg. 1, one-step baseline, App. Alg. 2
TEACHER_STEPS = ("ddim", "addim")  # MLCM's DDIM; MCM's adjusted DDIM (an option here)
TARGETS = ("eq7", "mcm")  # MLCM eq. 7 (latent L2); MCM Alg. 1's invDDIM x-target (an option)


def alpha_sigma_at(t, clean=None):
  """(alpha, sigma) [B] at integer timesteps t; where ``clean`` is True, (1, 0)."""
  alphas, sigmas = schedules.sdxl_alphas_sigmas(T)
  idx = jnp.clip(t, 0, T - 1).astype(jnp.int32)
  a, s = alphas[idx], sigmas[idx]
  if clean is not None:
    a, s = jnp.where(clean, 1.0, a), jnp.where(clean, 0.0, s)
  return a, s


def ddim(z, eps, t, target, target_clean=None):
  """``DDIM(z_t, eps, t -> target)``; ``target_clean`` marks targets that are the clean end."""
  a_t, s_t = alpha_sigma_at(t)
  a_s, s_s = alpha_sigma_at(target, target_clean)
  x_hat = (z - bcast(s_t, z) * eps) / bcast(a_t, z)
  return bcast(a_s, z) * x_hat + bcast(s_s, z) * eps


def milestones(num_segments):
  """[K + 1] integer milestones ``s T / K`` (static numpy)."""
  return (np.arange(num_segments + 1) * T // num_segments).astype(np.int32)


def sample_times(rng, batch, num_segments, skip):
  """(segment s, t_m, t_n, segment start) per example, all [B] int32."""
  ks, km = jax.random.split(rng)
  s = jax.random.randint(ks, (batch,), 0, num_segments)
  ms = jnp.asarray(milestones(num_segments))
  lo, hi = ms[s] + 1, jnp.minimum(ms[s + 1], T - 1)
  t_m = lo + jnp.floor(jax.random.uniform(km, (batch,)) * (hi - lo + 1)).astype(jnp.int32)
  t_m = jnp.minimum(t_m, hi)
  t_n = jnp.maximum(t_m - skip, ms[s])
  return s, t_m, t_n, ms[s]


def guided_eps(eps_fn, z, t, cond, uncond, scale):
  """Classifier-free guidance (eq. 8): ``eps(z, 0) + w (eps(z, c) - eps(z, 0))``, one batched
  call for both halves."""
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
  e = eps_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both)
  e_c, e_u = jnp.split(e, 2)
  return e_u + scale * (e_c - e_u)


def denoise_to(eps_fn, noise, t_m, num_steps, step_size, max_steps):
  """``z_{t_m}`` from ``z_{999} = noise`` by DDIM steps of ``eps_fn(z, t)``: per example
  ``num_steps`` [B] steps of ``step_size`` [B] timesteps from 999, the last one clipped at
  ``t_m``. ``max_steps`` (static) bounds the loop; finished examples stay put."""
  top = T - 1

  def body(i, z):
    t = jnp.round(top - i * step_size).astype(jnp.int32)
    nxt = jnp.maximum(jnp.round(top - (i + 1) * step_size).astype(jnp.int32), t_m)
    z_next = ddim(z, eps_fn(z, t), t, nxt)
    return jnp.where(bcast((i < num_steps) & (t > t_m), z), z_next, z)

  return jax.lax.fori_loop(0, max_steps, body, noise)


def image_free_latents(kind, eps_fn, noise, segment, t_m, num_segments):
  """Image-free ``z_{t_m}`` (MLCM 3.3): 'mdi' = App. Alg. 1 (``K - s`` equal guided-teacher
  steps, more for smaller t_m), 'sdi' = one step (the ablation baseline), 'progressive' =
  App. Alg. 2 (steps of ``T / (2K)`` with the previous stage's MLCM as ``eps_fn``)."""
  top = T - 1
  if kind == "mdi":
    steps = num_segments - segment
    return denoise_to(eps_fn, noise, t_m, steps, (top - t_m) / steps, num_segments)
  if kind == "sdi":
    return denoise_to(eps_fn, noise, t_m, jnp.ones_like(t_m), (top - t_m) * 1.0, 1)
  if kind == "progressive":
    size = T / (2 * num_segments)
    steps = jnp.ceil((top - t_m) / size).astype(jnp.int32)
    return denoise_to(eps_fn, noise, t_m, steps, jnp.full(t_m.shape, size),
                      int(np.ceil(top / size)))
  raise ValueError(f"image-free data {kind!r} is not known; allowed: {IMAGE_FREE}")


def teacher_step(teacher_eps, z_tm, t_m, t_n, sampler="ddim"):
  """``z_{t_n} = DDIM(z_{t_m}, teacher_eps(z_{t_m}), t_m -> t_n)`` (eq. 8; no gradient), or
  with ``sampler='addim'`` MCM's adjusted DDIM with the analytic ``x_var = 0.1 / (2 + SNR(t_m))``
  (image-free data has no x to measure it from)."""
  eps = teacher_eps(z_tm, t_m)
  if sampler == "ddim":
    return jax.lax.stop_gradient(ddim(z_tm, eps, t_m, t_n))
  if sampler != "addim":
    raise ValueError(f"teacher step {sampler!r} is not known; allowed: {TEACHER_STEPS}")
  a_m, s_m = alpha_sigma_at(t_m)
  a_n, s_n = alpha_sigma_at(t_n)
  x = (z_tm - bcast(s_m, z_tm) * eps) / bcast(a_m, z_tm)
  return jax.lax.stop_gradient(
      addim.addim_step(x, z_tm, a_m, s_m, a_n, s_n, addim.analytic_x_var(a_m, s_m)))


def mlcd_terms(student_eps, z_tm, z_tn, t_m, t_n, seg_start):
  """{'pred', 'target', 'x_hat'}: the two DDIM endpoints of eq. 7 at the segment start (the
  target a stop-gradient) and the student's clean estimate at ``z_{t_m}`` (for rewards)."""
  clean = seg_start == 0
  a_m, s_m = alpha_sigma_at(t_m)
  eps_m = student_eps(z_tm, t_m)
  pred = ddim(z_tm, eps_m, t_m, seg_start, clean)
  at_start = (t_n == seg_start) & ~clean
  target = ddim(z_tn, student_eps(z_tn, t_n), t_n, seg_start, clean)
  target = jax.lax.stop_gradient(jnp.where(bcast(at_start, z_tn), z_tn, target))
  x_hat = (z_tm - bcast(s_m, z_tm) * eps_m) / bcast(a_m, z_tm)
  return {"pred": pred, "target": target, "x_hat": x_hat}


def objective(terms, z_tm, t_m, seg_start, target="eq7", huber_eps=1.0):
  """Per-example loss from ``mlcd_terms``: 'eq7' = ``mean (pred - target)^2`` (MLCM), or 'mcm' =
  MCM Alg. 1 in latent space: ``x_target = invDDIM_{t_m -> t_step}(target, z_{t_m})`` and
  ``(SNR(t_m) + 1) * pseudo_huber(x_hat - x_target, huber_eps)``."""
  if target == "eq7":
    return jnp.mean((terms["pred"] - terms["target"]) ** 2, axis=tuple(range(1, z_tm.ndim)))
  if target != "mcm":
    raise ValueError(f"target {target!r} is not known; allowed: {TARGETS}")
  a_m, s_m = alpha_sigma_at(t_m)
  a_s, s_s = alpha_sigma_at(seg_start, seg_start == 0)
  x_target = jax.lax.stop_gradient(addim.inv_ddim(terms["target"], z_tm, a_m, s_m, a_s, s_s))
  weight = a_m ** 2 / s_m ** 2 + 1.0
  return weight * consistency.pseudo_huber(terms["x_hat"] - x_target, huber_eps)


def mlcd_from_pair(student_eps, z_tm, z_tn, t_m, t_n, seg_start, target="eq7", huber_eps=1.0):
  """Per-example MLCD for a given pair (``z_{t_m}``, ``z_{t_n}``), e.g. from a precomputed
  trajectory bank. ``student_eps(z, t)`` is differentiated only at ``z_{t_m}``."""
  terms = mlcd_terms(student_eps, z_tm, z_tn, t_m, t_n, seg_start)
  return objective(terms, z_tm, t_m, seg_start, target, huber_eps)


def mlcd_loss(student_eps, teacher_eps, z_tm, t_m, t_n, seg_start):
  """(per-example loss [B], z_{t_n}) of MLCM eq. 7 given ``z_{t_m}``.

  ``student_eps(z, t)`` (differentiated), ``teacher_eps(z, t)`` (e.g. ``guided_eps``; not
  differentiated). The segment-0 endpoint is the clean latent.
  """
  z_tn = teacher_step(teacher_eps, z_tm, t_m, t_n)
  return mlcd_from_pair(student_eps, z_tm, z_tn, t_m, t_n, seg_start), z_tn


def consistency_sample(eps_fn, noise, num_steps):
  """Few-step MLCM sampling: DDIM from T - 1 = 999 through the milestones of ``num_steps``
  segments down to the clean latent (the student's own map on each segment)."""
  ms = milestones(num_steps)  # static: the loop unrolls num_steps calls
  b = noise.shape[0]
  z = noise
  for i in range(num_steps, 0, -1):
    t = jnp.full((b,), min(int(ms[i]), T - 1), jnp.int32)
    target = jnp.full((b,), int(ms[i - 1]), jnp.int32)
    z = ddim(z, eps_fn(z, t), t, target, target == 0)
  return z
