"""MLCM (multistep latent consistency distillation, MLCM eq. 7-8 and App. A.3): what is MLCM's
own, as pure functions. The diffusion math is the shared one: SDXL's discrete schedule is
``schedules.sdxl_logsnr`` (time = integer timestep 0..999), models are denoisers
``f(z, t) -> x_hat`` (``parameterization.make_denoiser``; SDXL's epsilon UNet through
``models.sdxl.make_denoiser``), DDIM / aDDIM steps and samplers come from ``samplers.addim``
and guidance from ``guidance``.

Segments: K milestones ``t_step^s = s T / K`` (T = 1000); segment s holds timesteps
``(t_step^s, t_step^{s+1}]`` (the top one capped at 999) and its endpoint is ``t_step^s``, the
clean latent for s = 0 (logsnr = +inf: alpha = 1, sigma = 0). Loss for one example:
s ~ U{0..K-1}, ``t_m ~ U(segment s)``, ``t_n = max(t_m - k, t_step^s)``,
``z_{t_n} = DDIM_{t_m -> t_n}(teacher(z_{t_m}), z_{t_m})`` (guided teacher, eq. 8), and
``L = mean || DDIM_{t_m -> t_step}(f(z_{t_m}), z_{t_m})
          - sg(DDIM_{t_n -> t_step}(f(z_{t_n}), z_{t_n})) ||^2``.
If ``t_n`` reaches the segment start the target is ``z_{t_n}`` itself (the boundary condition).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import consistency, guidance, schedules, sharding
from mcm_jax import rewards as reward_losses
from mcm_jax.errors import UserError
from mcm_jax.samplers import addim
from mcm_jax.samplers.addim import bcast

T = 1000
IMAGE_FREE = ("mdi", "sdi", "progressive")  # App. Alg. 1, one-step baseline, App. Alg. 2
TEACHER_STEPS = ("ddim", "addim")  # MLCM's DDIM; MCM's adjusted DDIM (an option here)
TARGETS = ("eq7", "mcm")  # MLCM eq. 7 (latent L2); MCM Alg. 1's invDDIM x-target (an option)
TEACHER_MODES = ("updated", "fixed")  # later stages' teacher: the previous MLCM (PDU) or CFG
CONDITIONING = ("context", "text_embeds", "time_ids")  # SDXL's, in a batch


class Hparams(NamedTuple):
  """One stage's MLCD settings (``objectives.mlcm_hparams`` maps a config to them)."""
  num_segments: int                 # K
  skip: int                         # k, in timesteps
  guidance_scale: float = 8.0       # w of eq. 8
  image_free: str = "mdi"           # stage-0 z_{t_m}: IMAGE_FREE[:2]
  teacher_mode: str = "updated"     # later stages: TEACHER_MODES
  teacher_step: str = "ddim"        # TEACHER_STEPS
  target: str = "eq7"               # TARGETS
  huber_eps: float = 1.0            # for target 'mcm'


class RewardHparams(NamedTuple):
  """Reward consistency + feedback learning (MLCM 3.4): ``rc_weight L_RC + fl_weight L_FL``."""
  rc_weight: float = 1.0
  fl_weight: float = 1e-3
  threshold: float = 8.0  # s0 of the feedback hinge (8 for the aesthetic score, 2 ImageReward)
  fl_steps: int = 1  # feedback learning scores the student's fl_steps-step sample from noise


def alpha_sigma(t, clean=None):
  """(alpha, sigma) [B] at integer timesteps t; where ``clean`` is True, (1, 0)."""
  logsnr = schedules.sdxl_logsnr(t)
  if clean is not None:
    logsnr = jnp.where(clean, jnp.inf, logsnr)
  return schedules.alpha_sigma(logsnr)


def ddim(x_hat, z, t, target, target_clean=None):
  """``DDIM_{t -> target}(x_hat, z_t)`` on SDXL timesteps; ``target_clean`` marks the clean end."""
  return addim.ddim_step(x_hat, z, *alpha_sigma(t), *alpha_sigma(target, target_clean))


def stage_settings(num_segments, skip, stage):
  """(K, k) of progressive stage ``stage``: K halves and k doubles each stage."""
  return num_segments // 2 ** stage, skip * 2 ** stage


def milestones(num_segments):
  """[K + 1] integer milestones ``s T / K`` (static numpy)."""
  return (np.arange(num_segments + 1) * T // num_segments).astype(np.int32)


def sampling_timesteps(num_steps):
  """The K-step sampler's grid: the milestones from the top (capped at 999) down to 0."""
  return np.minimum(milestones(num_steps), T - 1)[::-1].copy()


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


def denoise_to(f, noise, t_m, num_steps, step_size, max_steps, t_n=None, last_step="ddim"):
  """``z_{t_m}`` from ``z_{999} = noise`` by DDIM steps of ``f(z, t)``: per example
  ``num_steps`` [B] steps of ``step_size`` [B] timesteps from 999, the last one clipped at
  ``t_m``. ``max_steps`` (static) bounds the loop; finished examples stay put.

  With ``t_n`` [B] the loop runs once more and each example, on reaching ``t_m``, takes one
  ``teacher_update`` (``last_step``) of the same ``f`` to ``t_n``: returns ``(z_{t_m},
  z_{t_n})`` with ``f`` traced once, not twice (the same numbers as ``teacher_step`` after it;
  for SDXL one UNet fewer to compile)."""
  top = T - 1

  def body(i, carry):
    z, z_tm, done = carry
    t = jnp.round(top - i * step_size).astype(jnp.int32)
    nxt = jnp.maximum(jnp.round(top - (i + 1) * step_size).astype(jnp.int32), t_m)
    moving = (i < num_steps) & (t > t_m)
    if t_n is None:
      return jnp.where(bcast(moving, z), ddim(f(z, t), z, t, nxt), z), z_tm, done
    at_tm = ~moving & ~done  # z is z_{t_m}: this iteration steps it to t_n
    frm, to = jnp.where(moving, t, t_m), jnp.where(moving, nxt, t_n)
    x = f(z, frm)
    z_next = ddim(x, z, frm, to)
    if last_step != "ddim":
      z_next = jnp.where(bcast(moving, z), z_next, teacher_update(x, z, frm, to, last_step))
    return (jnp.where(bcast(moving | at_tm, z), z_next, z), jnp.where(bcast(at_tm, z), z, z_tm),
            done | at_tm)

  carry = (noise, noise, jnp.zeros(t_m.shape, bool))
  z, z_tm, _ = jax.lax.fori_loop(0, max_steps + (t_n is not None), body, carry)
  return z if t_n is None else (z_tm, z)


def image_free_latents(kind, f, noise, segment, t_m, num_segments, t_n=None, last_step="ddim"):
  """Image-free ``z_{t_m}`` (MLCM 3.3): 'mdi' = App. Alg. 1 (``K - s`` equal guided-teacher
  steps, more for smaller t_m), 'sdi' = one step (the ablation baseline), 'progressive' =
  App. Alg. 2 (steps of ``T / (2K)`` with the previous stage's MLCM as ``f``). With ``t_n``:
  ``(z_{t_m}, z_{t_n})``, the second by one more step of ``f`` (``denoise_to``)."""
  top = T - 1
  more = dict(t_n=t_n, last_step=last_step)
  if kind == "mdi":
    steps = num_segments - segment
    return denoise_to(f, noise, t_m, steps, (top - t_m) / steps, num_segments, **more)
  if kind == "sdi":
    return denoise_to(f, noise, t_m, jnp.ones_like(t_m), (top - t_m) * 1.0, 1, **more)
  if kind == "progressive":
    size = T / (2 * num_segments)
    steps = jnp.ceil((top - t_m) / size).astype(jnp.int32)
    return denoise_to(f, noise, t_m, steps, jnp.full(t_m.shape, size),
                      int(np.ceil(top / size)), **more)
  raise UserError(f"image-free data {kind!r} is not known; allowed: {IMAGE_FREE}")


def teacher_update(x, z_tm, t_m, t_n, sampler="ddim"):
  """``z_{t_n}`` from the teacher's ``x = teacher(z_{t_m})``: DDIM (eq. 8), or with
  ``sampler='addim'`` MCM's adjusted DDIM with the analytic ``x_var = 0.1 / (2 + SNR(t_m))``
  (image-free data has no x to measure it from). No gradient."""
  if sampler not in TEACHER_STEPS:
    raise UserError(f"teacher step {sampler!r} is not known; allowed: {TEACHER_STEPS}")
  a_m, s_m = alpha_sigma(t_m)
  a_n, s_n = alpha_sigma(t_n)
  if sampler == "ddim":
    return jax.lax.stop_gradient(addim.ddim_step(x, z_tm, a_m, s_m, a_n, s_n))
  return jax.lax.stop_gradient(
      addim.addim_step(x, z_tm, a_m, s_m, a_n, s_n, addim.analytic_x_var(a_m, s_m)))


def teacher_step(teacher, z_tm, t_m, t_n, sampler="ddim"):
  """``z_{t_n} = DDIM_{t_m -> t_n}(teacher(z_{t_m}), z_{t_m})`` (eq. 8; ``teacher_update``)."""
  return teacher_update(teacher(z_tm, t_m), z_tm, t_m, t_n, sampler)


def guided_denoiser(denoise_fn, params, cond, uncond, scale):
  """``f(z, t)``: the classifier-free guided teacher of eq. 8 (``guidance.guided`` of
  ``denoise_fn(params, z, t, cond)`` with ``uncond`` [1, ...] as the unconditional input)."""
  return lambda z, t: guidance.guided(lambda zz, tt, c: denoise_fn(params, zz, tt, c), z, t,
                                      cond, uncond, scale)[0]


def training_pair(rng, shape, hp, source, teacher, image_free=None):
  """One MLCD training pair made from noise (no images): ``{'segment', 't_m', 't_n',
  'seg_start', 'z_tm', 'z_tn'}`` with ``shape = [B, H, W, C]``. ``z_{t_m}`` = image-free latents
  of ``source`` (kind ``image_free``, default ``hp.image_free``), ``z_{t_n}`` = ``hp.teacher_step``
  of ``teacher`` from it. Used by the loss and by the trajectory-bank builder alike."""
  k_times, k_noise = jax.random.split(rng)
  s, t_m, t_n, start = sample_times(k_times, shape[0], hp.num_segments, hp.skip)
  noise = sharding.constrain_batch(jax.random.normal(k_noise, shape))
  kind = image_free or hp.image_free
  if source is teacher:  # both latents from one loop: one traced model call, not two
    z_tm, z_tn = image_free_latents(kind, source, noise, s, t_m, hp.num_segments, t_n,
                                    hp.teacher_step)
  else:
    z_tm = image_free_latents(kind, source, noise, s, t_m, hp.num_segments)
    z_tn = teacher_step(teacher, jax.lax.stop_gradient(z_tm), t_m, t_n, hp.teacher_step)
  z_tm, z_tn = jax.lax.stop_gradient(z_tm), jax.lax.stop_gradient(z_tn)
  return dict(segment=s, t_m=t_m, t_n=t_n, seg_start=start, z_tm=z_tm, z_tn=z_tn)


def mlcd_terms(student, z_tm, z_tn, t_m, t_n, seg_start):
  """{'pred', 'target', 'x_hat'}: the two DDIM endpoints of eq. 7 at the segment start (the
  target a stop-gradient) and the student's clean estimate at ``z_{t_m}`` (for rewards)."""
  clean = seg_start == 0
  x_hat = student(z_tm, t_m)
  pred = ddim(x_hat, z_tm, t_m, seg_start, clean)
  at_start = (t_n == seg_start) & ~clean
  target = ddim(student(z_tn, t_n), z_tn, t_n, seg_start, clean)
  target = jax.lax.stop_gradient(jnp.where(bcast(at_start, z_tn), z_tn, target))
  return {"pred": pred, "target": target, "x_hat": x_hat}


def objective(terms, z_tm, t_m, seg_start, target="eq7", huber_eps=1.0):
  """Per-example loss from ``mlcd_terms``: 'eq7' = ``mean (pred - target)^2`` (MLCM), or 'mcm' =
  MCM Alg. 1 in latent space: ``x_target = invDDIM_{t_m -> t_step}(target, z_{t_m})`` and
  ``(SNR(t_m) + 1) * pseudo_huber(x_hat - x_target, huber_eps)``."""
  if target == "eq7":
    return jnp.mean((terms["pred"] - terms["target"]) ** 2, axis=tuple(range(1, z_tm.ndim)))
  if target != "mcm":
    raise UserError(f"target {target!r} is not known; allowed: {TARGETS}")
  a_m, s_m = alpha_sigma(t_m)
  a_s, s_s = alpha_sigma(seg_start, seg_start == 0)
  x_target = jax.lax.stop_gradient(addim.inv_ddim(terms["target"], z_tm, a_m, s_m, a_s, s_s))
  weight = a_m ** 2 / s_m ** 2 + 1.0
  return weight * consistency.pseudo_huber(terms["x_hat"] - x_target, huber_eps)


SPACINGS = ("uniform", "trailing", "leading", "lcm")  # timestep grids (see ``timestep_grid``)
SAMPLERS = ("ddim", "lcm", "tcd")  # DDIM jumps (MLCM) / re-noised x_hat (LCM) / TCD's gamma


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
  [K - 1, B, ...]."""
  grid = np.asarray(grid)
  batch, z = z_init.shape[0], z_init
  full = lambda t: jnp.full((batch,), t, jnp.float32)
  for i in range(len(grid) - 1):
    t, s = int(grid[i]), int(np.floor((1 - gamma) * grid[i + 1]))
    x_hat = f(z, full(t))
    a_t, s_t = alpha_sigma(full(t))
    eps_hat = (z - bcast(a_t, z) * x_hat) / bcast(s_t, z)
    a_s, s_s = alpha_sigma(full(s))
    z = bcast(a_s, z) * x_hat + bcast(s_s, z) * eps_hat
    if i < len(grid) - 2 and gamma > 0:
      keep = (alpha_sigma(full(grid[i + 1]))[0] / a_s) ** 2  # abar_{i+1} / abar_s
      z = bcast(jnp.sqrt(keep), z) * z + bcast(jnp.sqrt(1 - keep), z) * noise[i]
  return z


def sample(f, noise, steps, sampler="ddim", rng=None, gamma=0.3):
  """Few-step sampling of a denoiser ``f(z, t)`` from ``noise`` (= z_999).

  ``steps``: an int K (MLCM's K segments: ``timestep_grid(K)``) or a grid from
  ``timestep_grid`` / ``explicit_grid`` (decreasing timesteps, then 0). ``sampler``: 'ddim' =
  deterministic DDIM jumps between the grid's timesteps (``addim.sample_on_grid``, what MLCM
  trains for); 'lcm' = LCM's multistep sampling as diffusers' LCMScheduler: ``lcm_boundary(f)``'s
  x_hat re-noised with fresh noise drawn from ``rng`` to the next timestep, the last x_hat
  returned (``addim.renoise_sample_on_grid``); 'tcd' = TCD's sampler with stochasticity
  ``gamma`` (``tcd_sample_on_grid``, fresh noise from ``rng``)."""
  grid = timestep_grid(int(steps)) if np.ndim(steps) == 0 else np.asarray(steps)
  if sampler == "ddim":
    return addim.sample_on_grid(f, noise, grid, schedules.sdxl_logsnr)
  if sampler not in SAMPLERS:
    raise UserError(f"sampler={sampler!r} is not known; allowed: {SAMPLERS}")
  fresh = sharding.constrain_batch(
      jax.random.normal(rng, (max(len(grid) - 2, 0),) + noise.shape, noise.dtype), axis=1)
  if sampler == "tcd":
    if not 0 <= gamma <= 1:
      raise UserError(f"gamma={gamma} is invalid; allowed: 0 <= gamma <= 1 (TCD's eta)")
    return tcd_sample_on_grid(f, noise, grid, gamma, fresh)
  return addim.renoise_sample_on_grid(lcm_boundary(f), noise, grid, schedules.sdxl_logsnr, fresh)


def loss(trainable, batch, rng, step, frozen, *, hp, denoise_fn, adapt, latent_shape,
         rewards=None, decode=None, score=None):
  """One MLCM stage's objective ``(loss, metrics)`` for ``train.train`` (pure).

  ``denoise_fn(params, z, t, cond) -> x_hat`` (the UNet as a denoiser), ``adapt(base,
  trainable) -> params`` (the LoRA attached, ``lora.attach``), ``latent_shape = (H, W, C)``. ``frozen``: {'unet': base
  params, 'teacher': teacher params (the base if absent), 'prev_lora': the previous stage's
  trainable or None, 'uncond': the unconditional conditioning [1, ...], and with rewards 'vae',
  'scorer'}. ``batch``: the conditioning {'context', 'text_embeds', 'time_ids'} and, from a
  trajectory bank, a ready pair {'z_tm', 'z_tn', 't_m', 't_n', 'seg_start'}.

  Stage 0 (no 'prev_lora'): ``z_{t_m}`` from the guided teacher (App. Alg. 1 'mdi' or 'sdi'),
  ``z_{t_n}`` by its step. Later stages: ``z_{t_m}`` from the previous MLCM (App. Alg. 2) and
  ``z_{t_n}`` from it ('updated', PDU) or from the guided teacher ('fixed', PDF). With
  ``rewards`` (RewardHparams), ``decode(vae_params, latents)`` and ``score(params, images,
  tokens)``: ``+ rc_weight L_RC + fl_weight L_FL``; ``tokens`` = the batch's ('reward_ids',
  'reward_mask') for a prompt-conditioned scorer (ImageReward), else None.
  """
  del step
  cond = {k: batch[k] for k in CONDITIONING}
  student_params = adapt(frozen["unet"], trainable)
  student = lambda z, t: denoise_fn(student_params, z, t, cond)
  if "z_tm" in batch:  # a trajectory-bank pair: no teacher call in this step
    pair = {k: batch[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")}
  else:
    guided = guided_denoiser(denoise_fn, frozen.get("teacher", frozen["unet"]), cond,
                             frozen["uncond"], hp.guidance_scale)
    shape = (cond["context"].shape[0],) + tuple(latent_shape)
    if frozen.get("prev_lora") is None:
      pair = training_pair(rng, shape, hp, guided, guided)
    else:
      prev_params = adapt(frozen["unet"], frozen["prev_lora"])
      previous = lambda z, t: denoise_fn(prev_params, z, t, cond)
      teacher = previous if hp.teacher_mode == "updated" else guided
      pair = training_pair(rng, shape, hp, previous, teacher, image_free="progressive")
  z_tm, t_m, start = pair["z_tm"], pair["t_m"], pair["seg_start"]
  terms = mlcd_terms(student, z_tm, pair["z_tn"], t_m, pair["t_n"], start)
  mlcd = jnp.mean(objective(terms, z_tm, t_m, start, hp.target, hp.huber_eps))
  metrics = {"t_m": jnp.mean(t_m.astype(jnp.float32))}
  if rewards is None:
    return mlcd, metrics
  tokens = (batch["reward_ids"], batch["reward_mask"]) if "reward_ids" in batch else None
  s_fn = lambda images: score(frozen["scorer"], images, tokens)
  # Reward consistency: both DDIM endpoints decoded and scored (the reference held fixed).
  rc = jnp.mean(reward_losses.reward_consistency(s_fn, decode(frozen["vae"], terms["pred"]),
                                              decode(frozen["vae"], terms["target"])))
  # Feedback learning on the student's own 1-2 step sample x_0 from fresh noise (MLCM 3.4),
  # gradients through the sampler.
  fl_noise = sharding.constrain_batch(
      jax.random.normal(jax.random.fold_in(rng, 1), z_tm.shape, z_tm.dtype))
  x_0 = sample(student, fl_noise, rewards.fl_steps)
  fl = jnp.mean(reward_losses.feedback(s_fn, decode(frozen["vae"], x_0), rewards.threshold))
  metrics.update(mlcd=mlcd, reward_consistency=rc, feedback=fl)
  return mlcd + rewards.rc_weight * rc + rewards.fl_weight * fl, metrics
