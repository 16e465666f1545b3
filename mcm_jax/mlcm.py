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

from mcm_jax import consistency, guidance, schedules, seeds, sharding
from mcm_jax import rewards as reward_losses
from mcm_jax.errors import UserError
from mcm_jax.samplers import addim, dpm_solver
from mcm_jax.samplers.discrete import (DPM_SOLVER_2, T, alpha_sigma, dpm_solver_2_step,
                                      milestones, sample)
from mcm_jax.samplers.addim import bcast

IMAGE_FREE = ("mdi", "sdi", "progressive")  # App. Alg. 1, one-step baseline, App. Alg. 2
# where z_{t_m} comes from: image-free (MDI, SDI), or real latents noised by the forward process
# (LCD / MLCD on images, MLCM Table 2's image-based rows; LCF)
SOURCES = ("mdi", "sdi", "images")
# z_{t_n} from the same latent and noise at t_n: consistency training, no teacher (LCF, LCM Alg. 4)
DATA_STEP = "data"
# the teacher's solver over the skip k (Psi of LCM eq. 8): MLCM's DDIM; MCM's adjusted DDIM;
# the singlestep second-order DPM-Solvers of LCM §4.3 (two teacher calls per step)
TEACHER_STEPS = ("ddim", "addim") + tuple(DPM_SOLVER_2)
# the steps of the image-free trajectory to z_{t_m}: MLCM's DDIM, or DPM-Solver++(2M) (LCM §4.3)
TRAJECTORY_STEPS = ("ddim", "dpmpp_2m")
TARGETS = ("eq7", "mcm")  # MLCM eq. 7 (latent L2); MCM Alg. 1's invDDIM x-target (an option)
TEACHER_MODES = ("updated", "fixed")  # later stages' teacher: the previous MLCM (PDU) or CFG
CONDITIONING = ("context", "text_embeds", "time_ids")  # SDXL's, in a batch


class Hparams(NamedTuple):
  """One stage's MLCD settings (``objectives.mlcm_hparams`` maps a config to them)."""
  num_segments: int                 # K
  skip: int                         # k, in timesteps
  guidance_scale: float = 8.0       # w of eq. 8
  source: str = "mdi"               # z_{t_m}: SOURCES ('mdi' / 'sdi': stage 0's image-free kind)
  teacher_mode: str = "updated"     # later stages: TEACHER_MODES
  teacher_step: str = "ddim"        # TEACHER_STEPS, or DATA_STEP with source 'images'
  trajectory_step: str = "ddim"     # TRAJECTORY_STEPS (stage 0's image-free latents)
  target: str = "eq7"               # TARGETS
  huber_eps: float = 1.0            # for target 'mcm'
  # LCM §4.2's guidance-conditioned student: () = w fixed at guidance_scale; (w_min, w_max) = w
  # drawn per example for the teacher and given to the student through its guidance embedding
  # (``timestep_cond`` of a UNet with time_cond_proj_dim = guidance_embedding_dim)
  guidance_range: tuple = ()
  guidance_embedding_dim: int = 0


class RewardHparams(NamedTuple):
  """Reward consistency + feedback learning (MLCM 3.4): ``rc_weight L_RC + fl_weight L_FL``."""
  rc_weight: float = 1.0
  fl_weight: float = 1e-3
  threshold: object = 8.0  # s0 of the feedback hinge (8 aesthetic, 2 ImageReward), one per scorer
  fl_steps: int = 1  # feedback learning scores the student's fl_steps-step sample from noise
  remat_decoder: bool = True  # the VAE decoder's activations recomputed in the backward pass


def ddim(x_hat, z, t, target, target_clean=None):
  """``DDIM_{t -> target}(x_hat, z_t)`` on SDXL timesteps; ``target_clean`` marks the clean end."""
  return addim.ddim_step(x_hat, z, *alpha_sigma(t), *alpha_sigma(target, target_clean))


def stage_settings(num_segments, skip, stage):
  """(K, k) of progressive stage ``stage``: K halves and k doubles each stage."""
  return num_segments // 2 ** stage, skip * 2 ** stage


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


def denoise_to(f, noise, t_m, num_steps, step_size, max_steps, t_n=None, last_step="ddim",
               solver="ddim"):
  """``z_{t_m}`` from ``z_{999} = noise`` by steps of ``f(z, t)``: per example ``num_steps``
  [B] steps of ``step_size`` [B] timesteps from 999, the last one clipped at ``t_m``; each a
  DDIM step (``solver='ddim'``) or a DPM-Solver++(2M) step (``'dpmpp_2m'``: from the second step
  on, it extrapolates with the example's previous ``x_hat``; ``dpm_solver.multistep_update``).
  ``max_steps`` (static) bounds the loop; finished examples stay put.

  With ``t_n`` [B] the loop runs once more and each example, on reaching ``t_m``, takes one
  ``teacher_update`` (``last_step``) of the same ``f`` to ``t_n``: returns ``(z_{t_m},
  z_{t_n})`` with ``f`` traced once, not twice (the same numbers as ``teacher_step`` after it;
  for SDXL one UNet fewer to compile)."""
  if solver not in TRAJECTORY_STEPS:
    raise UserError(f"trajectory step {solver!r} is not known; allowed: {TRAJECTORY_STEPS}")
  top = T - 1

  def trajectory_step(x, z, t, nxt, previous):
    """z at ``nxt`` along the trajectory from ``x = f(z_t, t)``."""
    if solver == "ddim":
      return ddim(x, z, t, nxt)
    prev_x, prev_t, first = previous
    logsnr = schedules.sdxl_logsnr
    return dpm_solver.multistep_update(x, prev_x, z, logsnr(prev_t), logsnr(t), logsnr(nxt),
                                       first)

  def body(i, carry):
    z, z_tm, done, prev_x, prev_t = carry
    t = jnp.round(top - i * step_size).astype(jnp.int32)
    nxt = jnp.maximum(jnp.round(top - (i + 1) * step_size).astype(jnp.int32), t_m)
    moving = (i < num_steps) & (t > t_m)
    previous = (prev_x, prev_t, i == 0)
    if t_n is None:
      x = f(z, t)
      z_next = jnp.where(bcast(moving, z), trajectory_step(x, z, t, nxt, previous), z)
      return z_next, z_tm, done, jnp.where(bcast(moving, z), x, prev_x), jnp.where(moving, t,
                                                                                   prev_t)
    at_tm = ~moving & ~done  # z is z_{t_m}: this iteration steps it to t_n
    frm, to = jnp.where(moving, t, t_m), jnp.where(moving, nxt, t_n)
    x = f(z, frm)
    z_next = jnp.where(bcast(moving, z), trajectory_step(x, z, frm, to, previous),
                       teacher_update(x, z, frm, to, last_step))
    return (jnp.where(bcast(moving | at_tm, z), z_next, z), jnp.where(bcast(at_tm, z), z, z_tm),
            done | at_tm, jnp.where(bcast(moving, z), x, prev_x), jnp.where(moving, t, prev_t))

  carry = (noise, noise, jnp.zeros(t_m.shape, bool), noise, jnp.full(t_m.shape, top))
  z, z_tm = jax.lax.fori_loop(0, max_steps + (t_n is not None), body, carry)[:2]
  return z if t_n is None else (z_tm, z)


def image_free_latents(kind, f, noise, segment, t_m, num_segments, t_n=None, last_step="ddim",
                       solver="ddim"):
  """Image-free ``z_{t_m}`` (MLCM 3.3): 'mdi' = App. Alg. 1 (``K - s`` equal guided-teacher
  steps, more for smaller t_m), 'sdi' = one step (the ablation baseline), 'progressive' =
  App. Alg. 2 (steps of ``T / (2K)`` with the previous stage's MLCM as ``f``); the steps are
  ``solver``'s (``denoise_to``). With ``t_n``: ``(z_{t_m}, z_{t_n})``, the second by one more
  step of ``f`` (``last_step``)."""
  top = T - 1
  more = dict(t_n=t_n, last_step=last_step, solver=solver)
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
  if sampler not in ("ddim", "addim"):
    raise UserError(f"teacher step {sampler!r} is not a one-call update; allowed: 'ddim', "
                    f"'addim' (all teacher steps, {TEACHER_STEPS}, through ``teacher_step``)")
  a_m, s_m = alpha_sigma(t_m)
  a_n, s_n = alpha_sigma(t_n)
  if sampler == "ddim":
    return jax.lax.stop_gradient(addim.ddim_step(x, z_tm, a_m, s_m, a_n, s_n))
  return jax.lax.stop_gradient(
      addim.addim_step(x, z_tm, a_m, s_m, a_n, s_n, addim.analytic_x_var(a_m, s_m)))


def teacher_step(teacher, z_tm, t_m, t_n, sampler="ddim"):
  """``z_{t_n} = Psi_{t_m -> t_n}(teacher, z_{t_m})``: 'ddim' / 'addim' from one teacher call
  (eq. 8; ``teacher_update``), 'dpm_solver_2' / 'dpmpp_2s' from two (``dpm_solver_2_step``).
  No gradient."""
  if sampler not in TEACHER_STEPS:
    raise UserError(f"teacher step {sampler!r} is not known; allowed: {TEACHER_STEPS}")
  if sampler in DPM_SOLVER_2:
    return jax.lax.stop_gradient(dpm_solver_2_step(teacher, z_tm, t_m, t_n, sampler))
  return teacher_update(teacher(z_tm, t_m), z_tm, t_m, t_n, sampler)


def sample_guidance(rng, batch, hp):
  """``(w, timestep_cond)``: the guided teacher's scale and the student's input for it. Fixed
  (``hp.guidance_scale``; the student takes no input, None) unless ``hp.guidance_range =
  (w_min, w_max)``: then ``w ~ U[w_min, w_max]`` per example [B] and ``timestep_cond =
  guidance.scale_embedding(w - 1, hp.guidance_embedding_dim)`` [B, dim], the student
  ``f(z, w, c, t)`` of LCM §4.2 (LCM's omega is w - 1)."""
  if not hp.guidance_range:
    return hp.guidance_scale, None
  lo, hi = hp.guidance_range
  w = jax.random.uniform(rng, (batch,), minval=lo, maxval=hi)
  return w, guidance.scale_embedding(w - 1.0, hp.guidance_embedding_dim)


def guided_denoiser(denoise_fn, params, cond, uncond, scale):
  """``f(z, t)``: the classifier-free guided teacher of eq. 8 (``guidance.guided`` of
  ``denoise_fn(params, z, t, cond)`` with ``uncond`` [1, ...] as the unconditional input;
  ``scale`` a number or one per example)."""
  return lambda z, t: guidance.guided(lambda zz, tt, c: denoise_fn(params, zz, tt, c), z, t,
                                      cond, uncond, scale)[0]


def training_pair(rng, shape, hp, source, teacher, image_free=None):
  """One MLCD training pair made from noise (no images): ``{'segment', 't_m', 't_n',
  'seg_start', 'z_tm', 'z_tn'}`` with ``shape = [B, H, W, C]``. ``z_{t_m}`` = image-free latents
  of ``source`` (kind ``image_free``, default ``hp.source``), ``z_{t_n}`` = ``hp.teacher_step``
  of ``teacher`` from it. Used by the loss and by the trajectory-bank builder alike."""
  k_times, k_noise = jax.random.split(rng)
  s, t_m, t_n, start = sample_times(k_times, shape[0], hp.num_segments, hp.skip)
  noise = sharding.constrain_batch(jax.random.normal(k_noise, shape))
  kind = image_free or hp.source
  # Both latents from one loop (one traced model call, not two) when the teacher step is one call.
  if source is teacher and hp.teacher_step not in DPM_SOLVER_2:
    z_tm, z_tn = image_free_latents(kind, source, noise, s, t_m, hp.num_segments, t_n,
                                    hp.teacher_step, hp.trajectory_step)
  else:
    z_tm = image_free_latents(kind, source, noise, s, t_m, hp.num_segments,
                              solver=hp.trajectory_step)
    z_tn = teacher_step(teacher, jax.lax.stop_gradient(z_tm), t_m, t_n, hp.teacher_step)
  z_tm, z_tn = jax.lax.stop_gradient(z_tm), jax.lax.stop_gradient(z_tn)
  return dict(segment=s, t_m=t_m, t_n=t_n, seg_start=start, z_tm=z_tm, z_tn=z_tn)


def image_pair(rng, latents, hp, teacher):
  """One training pair from real latents ``z_0`` [B, H, W, C] (same keys as ``training_pair``):
  ``z_{t_m} = alpha_{t_m} z_0 + sigma_{t_m} eps`` (LCM Alg. 1 / 4), and ``z_{t_n}`` either
  ``hp.teacher_step`` of ``teacher`` from it (LCD / MLCD on images) or, with ``teacher_step =
  'data'``, the forward process at ``t_n`` with the same ``eps`` (LCF, LCM Alg. 4: consistency
  training, no teacher; ``teacher`` unused)."""
  k_times, k_noise = jax.random.split(rng)
  s, t_m, t_n, start = sample_times(k_times, latents.shape[0], hp.num_segments, hp.skip)
  latents = jax.lax.stop_gradient(latents)
  noise = sharding.constrain_batch(jax.random.normal(k_noise, latents.shape, latents.dtype))
  z_tm = addim.noised(latents, noise, *alpha_sigma(t_m))
  if hp.teacher_step == DATA_STEP:
    z_tn = addim.noised(latents, noise, *alpha_sigma(t_n))
  else:
    z_tn = teacher_step(teacher, z_tm, t_m, t_n, hp.teacher_step)
  return dict(segment=s, t_m=t_m, t_n=t_n, seg_start=start, z_tm=z_tm,
              z_tn=jax.lax.stop_gradient(z_tn))


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


def mlcd_distance(terms, z_tm, t_m, seg_start, target="eq7", huber_eps=1.0):
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


def loss(trainable, batch, rng, step, frozen, *, hp, denoise_fn, adapt, latent_shape,
         rewards=None, decode=None, score=None, encode=None):
  """One MLCM stage's objective ``(loss, metrics)`` for ``train.train`` (pure).

  ``denoise_fn(params, z, t, cond) -> x_hat`` (the UNet as a denoiser), ``adapt(base,
  trainable) -> params`` (the student's parameters: the LoRA attached, ``lora.attach``, or a
  full UNet student's own), ``latent_shape = (H, W, C)``.
  ``frozen``: {'unet': base params, 'teacher': teacher params (the base if absent),
  'previous': the previous stage's trainable or None, 'uncond': the unconditional
  conditioning [1, ...], and with rewards or uncached images 'vae', with rewards 'scorer'}.
  ``batch``: the conditioning {'context', 'text_embeds', 'time_ids'} and, from a trajectory
  bank, a ready pair {'z_tm', 'z_tn', 't_m', 't_n', 'seg_start'}; with ``hp.source =
  'images'``, the images' latents 'latents' (cached) or the images 'image' [B, fH, fW, 3] in
  [-1, 1] (f: the VAE's factor), encoded here by ``encode(frozen['vae'], images)``
  (``image_pair``).

  Stage 0 (no 'previous'): ``z_{t_m}`` from the guided teacher (App. Alg. 1 'mdi' or 'sdi'),
  ``z_{t_n}`` by its step. Later stages: ``z_{t_m}`` from the previous MLCM (App. Alg. 2) and
  ``z_{t_n}`` from it ('updated', PDU) or from the guided teacher ('fixed', PDF). From images,
  every stage noises the real latents and steps them with that stage's teacher. With
  ``rewards`` (RewardHparams), ``decode(vae_params, latents)`` and ``score(params, images,
  tokens)``: ``+ rc_weight L_RC + fl_weight L_FL``; ``tokens`` = the batch's ('reward_ids',
  'reward_mask') for a prompt-conditioned scorer (ImageReward), else None. With
  ``hp.guidance_range`` the teacher's w is drawn per example and the student (and a previous
  stage's) sees it (``sample_guidance``; LCM §4.2).
  """
  del step
  cond = {k: batch[k] for k in CONDITIONING}
  scale, timestep_cond = sample_guidance(
      jax.random.fold_in(rng, seeds.stream_id("guidance_scale")), cond["context"].shape[0], hp)
  student_cond = cond if timestep_cond is None else dict(cond, timestep_cond=timestep_cond)
  student_params = adapt(frozen["unet"], trainable)
  student = lambda z, t: denoise_fn(student_params, z, t, student_cond)
  if "z_tm" in batch:  # a trajectory-bank pair: no teacher call in this step
    pair = {k: batch[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")}
  else:
    guided = guided_denoiser(denoise_fn, frozen.get("teacher", frozen["unet"]), cond,
                             frozen["uncond"], scale)
    shape = (cond["context"].shape[0],) + tuple(latent_shape)
    previous = teacher = guided
    if frozen.get("previous") is not None:
      prev_params = adapt(frozen["unet"], frozen["previous"])
      previous = lambda z, t: denoise_fn(prev_params, z, t, student_cond)
      teacher = previous if hp.teacher_mode == "updated" else guided
    if hp.source == "images":
      latents = batch["latents"] if "latents" in batch else encode(frozen["vae"], batch["image"])
      pair = image_pair(rng, latents, hp, teacher)
    elif frozen.get("previous") is None:
      pair = training_pair(rng, shape, hp, guided, guided)
    else:
      pair = training_pair(rng, shape, hp, previous, teacher, image_free="progressive")
  z_tm, t_m, start = pair["z_tm"], pair["t_m"], pair["seg_start"]
  terms = mlcd_terms(student, z_tm, pair["z_tn"], t_m, pair["t_n"], start)
  mlcd = jnp.mean(mlcd_distance(terms, z_tm, t_m, start, hp.target, hp.huber_eps))
  metrics = {"t_m": jnp.mean(t_m.astype(jnp.float32))}
  if rewards is None:
    return mlcd, metrics
  tokens = (batch["reward_ids"], batch["reward_mask"]) if "reward_ids" in batch else None
  s_fn = lambda images: score(frozen["scorer"], images, tokens)
  to_images = lambda latents: decode(frozen["vae"], latents)
  if rewards.remat_decoder:  # full-resolution feature maps: recomputed, not stored
    to_images = jax.checkpoint(to_images)
  # Reward consistency: both DDIM endpoints decoded and scored (the reference held fixed).
  rc = jnp.mean(reward_losses.reward_consistency(s_fn, to_images(terms["pred"]),
                                              to_images(terms["target"])))
  metrics.update(mlcd=mlcd, reward_consistency=rc)
  if not rewards.fl_weight:  # no feedback learning in this stage: nothing sampled or scored
    return mlcd + rewards.rc_weight * rc, metrics
  # Feedback learning on the student's own 1-2 step sample x_0 from fresh noise (MLCM 3.4),
  # gradients through the sampler (unrolled: no stacked copy of the UNet's weights).
  fl_noise = sharding.constrain_batch(
      jax.random.normal(jax.random.fold_in(rng, 1), z_tm.shape, z_tm.dtype))
  x_0 = sample(student, fl_noise, rewards.fl_steps, unrolled=True)
  fl = jnp.mean(reward_losses.feedback(s_fn, to_images(x_0), rewards.threshold))
  metrics.update(feedback=fl)
  return mlcd + rewards.rc_weight * rc + rewards.fl_weight * fl, metrics
