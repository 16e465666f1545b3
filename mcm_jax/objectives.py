"""Config -> model functions and training objectives, in one place.

Every runner, benchmark and test that turns a config into a denoiser or a loss calls these, so
the mapping from config fields to the pure functions' arguments is written once:
- ``logsnr_fn(config.schedule)``; ``toy_model(config)`` / ``uvit_model(config)`` ->
  (Flax model, logsnr_fn, ``denoise(params, z, t, cond, rng) -> x_hat``);
- ``diffusion_loss``, ``consistency_loss`` (MCM Alg. 1, from ``config.consistency``),
  ``mlcm_hparams`` / ``reward_hparams`` / ``mlcm_loss`` (MLCM, from ``config.mlcm``,
  ``config.rewards``, ``config.lora``).
The losses are ``loss(params, batch, rng, step, frozen) -> (loss, metrics)`` for ``train.train``.
"""
import functools

import jax
import jax.numpy as jnp

from mcm_jax import consistency, diffusion, lora, mlcm, parameterization, rewards, schedules

_SCHEDULE_FIELDS = ("image_res", "noise_res", "noise_res_low", "noise_res_high", "logsnr_min",
                    "logsnr_max", "clip_after_shift")


def logsnr_fn(schedule):
  """``t -> logsnr`` of a config's ``schedule`` section (``schedules.get_logsnr_fn``)."""
  return schedules.get_logsnr_fn(schedule.name, **{k: schedule[k] for k in _SCHEDULE_FIELDS
                                                   if k in schedule})


def toy_model(config, student_steps=None):
  """(MLP, logsnr_fn, denoise) of the toy: v-prediction on logsnr, no conditioning. With
  ``student_steps`` and ``config.model.segment_input``, the model of an S-step student that
  also sees its position within the segment (``consistency.segment_position``)."""
  from mcm_jax.models.mlp import MLPDenoiser  # pylint: disable=g-import-not-at-top
  model = MLPDenoiser(hidden=config.model.hidden, depth=config.model.depth)
  fn = logsnr_fn(config.schedule)
  apply_fn = lambda params, z, logsnr, cond, rng: model.apply(params, z, logsnr)
  denoise = parameterization.make_denoiser(apply_fn, fn, "v")
  if student_steps and config.model.get("segment_input", False):
    seg_apply = lambda params, z, logsnr, cond, rng: model.apply(params, z, logsnr,
                                                                 segment=cond[1])
    denoise = _with_segment_position(parameterization.make_denoiser(seg_apply, fn, "v"),
                                     student_steps)
  return model, fn, denoise


def _with_segment_position(denoise, student_steps):
  """``denoise`` of a segment-aware student, called as a plain one: its ``cond`` becomes
  ``(cond, consistency.segment_position(t, student_steps))``."""
  return lambda params, z, t, cond=None, rng=None: denoise(
      params, z, t, (cond, consistency.segment_position(t, student_steps)), rng)


def uvit_model(config, student_steps=None):
  """(UViT, logsnr_fn, denoise) of a pixel config: v-prediction, class-conditional, dropout
  when an rng is given (training). With ``student_steps`` and ``config.model.segment_input``,
  the model of an S-step student that also sees its position within the segment
  (``consistency.segment_position``; ``uvit_init`` makes its parameters)."""
  from mcm_jax.models.uvit import UViT, uvit_config  # pylint: disable=g-import-not-at-top
  c = config
  kw = uvit_config(c.model.resolution, c.model.size)
  kw.update(num_classes=c.data.num_classes, out_channels=c.data.channels,
            dtype=jnp.dtype(c.model.dtype), remat=c.model.remat)
  model = UViT(**kw)
  fn = logsnr_fn(c.schedule)
  segmented = bool(student_steps) and c.model.get("segment_input", False)

  def apply_fn(params, z, logsnr, cond, rng):
    label, extra = (cond[0], {"segment": cond[1]}) if segmented else (cond, {})
    if rng is None:
      return model.apply(params, z, logsnr, label, **extra)
    return model.apply(params, z, logsnr, label, train=True, rngs={"dropout": rng}, **extra)

  denoise = parameterization.make_denoiser(apply_fn, fn, "v")
  if segmented:
    denoise = _with_segment_position(denoise, student_steps)
  return model, fn, denoise


def uvit_init(model, segmented):
  """``init(rng, z, logsnr, label)`` of a UViT's parameters, with the segment embedding when
  ``segmented`` (``uvit_model``'s student)."""
  if not segmented:
    return model.init
  return lambda rng, z, logsnr, label: model.init(rng, z, logsnr, label,
                                                  segment=jnp.ones(z.shape[:1]))


def uvit_inputs(config):
  """Shapes of one UViT call (z, logsnr, label), for ``init`` / ``eval_shape``."""
  res, ch = config.data.resolution, config.data.channels
  return (jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))


def diffusion_loss(denoise, fn, multiscale_levels=0, p_uncond=0.0, null_cond=None):
  """v-prediction, SNR + 1 weighted diffusion loss (pre-training), labels dropped to
  ``null_cond`` with probability ``p_uncond``."""
  return functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=fn,
                           multiscale_levels=multiscale_levels, p_uncond=p_uncond,
                           null_cond=null_cond)


def consistency_loss(cc, denoise, fn, *, student_steps, teacher_sampler=None,
                     guidance_scale=1.0, null_cond=None, teacher_denoise=None):
  """MCM Alg. 1 from a ``consistency`` config section: CT when ``teacher_sampler`` is None,
  else CD with that teacher sampler ('addim' / 'ddim') and the teacher's network
  (``teacher_denoise``, default the student's own) with parameters that come as ``frozen``."""
  teacher_denoise = teacher_denoise or denoise
  return functools.partial(
      consistency.consistency_loss, denoise_fn=denoise, logsnr_fn=fn,
      student_steps=student_steps,
      teacher_fn=None if teacher_sampler is None else teacher_denoise,
      teacher_sampler=teacher_sampler or "addim", teacher_steps_start=cc.teacher_steps_start,
      teacher_steps_end=cc.teacher_steps_end, teacher_steps_horizon=cc.teacher_steps_horizon,
      xvar_frac=cc.xvar_frac, huber_eps=cc.huber_eps, loss_weight=cc.loss_weight,
      guidance_scale=guidance_scale, null_cond=null_cond)


def pixel_loss(config, denoise, fn, teacher_denoise=None):
  """The loss of a pixel config's ``objective``: 'base' diffusion (labels dropped to the null
  label ``num_classes`` with probability ``p_uncond``), or CD / CT of
  ``consistency.student_steps`` (CD guided by ``consistency.guidance_scale``, the null label as
  the unconditional input; ``teacher_denoise``: the teacher's network where the student's
  differs, i.e. with ``model.segment_input``)."""
  c = config
  if c.objective == "base":
    return diffusion_loss(denoise, fn, c.multiscale_levels, c.p_uncond, c.data.num_classes)
  cc = c.consistency
  return consistency_loss(cc, denoise, fn, student_steps=cc.student_steps,
                          teacher_sampler=cc.teacher_sampler if c.objective == "cd" else None,
                          guidance_scale=cc.guidance_scale, null_cond=c.data.num_classes,
                          teacher_denoise=teacher_denoise)


TOY_METHODS = {"ct": None, "cd_addim": "addim", "cd_ddim": "ddim"}  # method -> teacher sampler


def toy_loss(config, denoise, fn, method, student_steps, teacher_denoise=None):
  """CT / CD (aDDIM or DDIM teacher) student loss of the toy sweep; ``teacher_denoise``: the
  teacher's network when the student's differs (``toy_model(config, student_steps)``)."""
  return consistency_loss(config.consistency, denoise, fn, student_steps=student_steps,
                          teacher_sampler=TOY_METHODS[method], teacher_denoise=teacher_denoise)


def mlcm_hparams(config, stage):
  """``mlcm.Hparams`` of progressive stage ``stage`` (K halves and k doubles per stage)."""
  m = config.mlcm
  num_segments, skip = mlcm.stage_settings(m.num_segments, m.skip, stage)
  guidance_range = tuple(float(w) for w in m.get("guidance_range", ()))
  return mlcm.Hparams(num_segments=num_segments, skip=skip, guidance_scale=m.guidance_scale,
                      source=m.source, teacher_mode=m.teacher_mode,
                      teacher_step=m.teacher_step, trajectory_step=m.trajectory_step,
                      target=m.target, huber_eps=m.huber_eps, guidance_range=guidance_range,
                      guidance_embedding_dim=config.unet.time_cond_proj_dim
                      if guidance_range else 0)


def reward_hparams(config, stage=0):
  """``mlcm.RewardHparams`` of stage ``stage`` from ``config.rewards``, or None when no scorer
  is set: threshold () (or None) = each scorer's s0 (``rewards.THRESHOLDS``), else one per
  scorer; feedback learning only from stage ``fl_from_stage`` on (MLCM 3.4: the late stages,
  whose few-step samples are realistic), weight 0 before."""
  r = config.rewards
  names = rewards.scorer_names(r.scorer)
  if not names:
    return None
  t = r.threshold
  given = tuple(t) if isinstance(t, (list, tuple)) else () if t is None else (t,)
  threshold = given or tuple(rewards.THRESHOLDS[n] for n in names)
  fl_weight = r.fl_weight if stage >= r.get("fl_from_stage", 0) else 0.0
  return mlcm.RewardHparams(rc_weight=r.rc_weight, fl_weight=fl_weight,
                            threshold=threshold[0] if len(threshold) == 1 else threshold,
                            fl_steps=r.fl_steps, remat_decoder=r.get("remat_decoder", True))


def mlcm_reads_bank(config, stage):
  """Whether MLCM stage ``stage`` streams its pairs from the trajectory bank: stage 0 only,
  when ``mlcm.bank.dir`` is set (later stages run the previous stage's MLCM in the step)."""
  return stage == 0 and bool(config.mlcm.bank.dir)


def student_params_fn(config):
  """``adapt(base, trainable) -> the student's UNet parameters`` (``config.trainable``): 'lora'
  attaches the LoRA at ``lora.scale`` to the frozen base (``lora.attach``), 'unet' is the whole
  UNet (the trainable tree itself)."""
  if config.get("trainable", "lora") == "unet":
    return lambda base, trainable: trainable
  return functools.partial(lora.attach, scale=config.lora.scale)


def mlcm_loss(config, denoise, stage, decode=None, score=None, encode=None):
  """``mlcm.loss`` of one stage: the trainable tree is the LoRA or the whole UNet
  (``student_params_fn``);
  ``denoise(params, z, t, cond)`` is the UNet as a denoiser (``models.sdxl.make_denoiser``);
  ``encode(vae_params, images)`` the VAE encoder when the batch holds images."""
  res = config.latent_resolution
  return functools.partial(
      mlcm.loss, hp=mlcm_hparams(config, stage), denoise_fn=denoise,
      adapt=student_params_fn(config), latent_shape=(res, res, 4),
      rewards=reward_hparams(config, stage), decode=decode, score=score, encode=encode)
