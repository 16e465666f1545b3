"""MLCM: multistep latent consistency distillation of an SDXL-architecture UNet into a LoRA,
with progressive stages (K -> K/2 with k -> 2k), image-free data from teacher trajectories and
the one training loop (``train.train``: the LoRA tree is the trained state; the UNet weights
are ``frozen`` and sharded over the mesh).

Stage 0: ``z_{t_m}`` from noise by the guided teacher (MLCM App. Alg. 1, 'mdi'; or 'sdi'),
``z_{t_n}`` by one guided-teacher DDIM step. Stage i > 0 starts from stage i-1's LoRA; its
``z_{t_m}`` come from stage i-1's MLCM (App. Alg. 2) and its ``z_{t_n}`` from that MLCM
('updated', PDU) or from the guided teacher ('fixed', PDF). Each stage is its own run in
``workdir/stage<i>`` (restore-or-init; finished stages are reused) and exports its LoRA in
diffusers' layout to ``workdir/stage<i>/lora/pytorch_lora_weights.safetensors``.
"""
import functools
import json
import logging
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mcm_jax import lora as lora_lib
from mcm_jax import generate, mlcm, plotting, rewards, sharding, train
from mcm_jax.config_validation import ConfigError, check_in, validate_train
from mcm_jax.data import prompts as prompt_data
from mcm_jax.data import trajectory_bank
from mcm_jax.data.images import local_indices_fn
from mcm_jax.metric_writer import create_writer
from mcm_jax.models import sdxl

TEACHER_MODES = ("updated", "fixed")


def default_config(size):
  """MLCM's settings (App. A.2): Adam 1e-5, batch 24, 40k iterations, K = 8, k = 20, w = 8.
  ``size='tiny'``: a random tiny SDXL-architecture UNet and a hashed-token text stand-in."""
  tiny = size == "tiny"
  c = ml_collections.ConfigDict()
  c.experiment = "mlcm"
  c.seed = 0
  # Local diffusers-layout SDXL directories (nothing downloads). The teacher may be another
  # SDXL-architecture checkpoint (MLCM uses a fine-tune); '' = the student's UNet.
  c.student_unet = "" if tiny else "/models/stable-diffusion-xl-base-1.0"
  c.teacher_unet = ""
  c.text_encoder = "hashed" if tiny else "sdxl"  # 'hashed': tests only (no CLIP weights)
  c.prompts = "" if tiny else "/data/laion_aesthetics_6plus.txt"  # .txt / .jsonl / .parquet
  c.latent_resolution = 8 if tiny else 128  # 1024 px / 8
  c.dtype = "float32" if tiny else "bfloat16"  # UNet compute dtype; weights and LoRA float32
  c.lora = dict(rank=4 if tiny else 64, scale=1.0,
                targets=lora_lib.DEFAULT_TARGETS)  # rank is not given by MLCM; 64 as LCM-LoRA
  c.mlcm = dict(
      num_segments=4 if tiny else 8,   # K of the first stage
      skip=20,                          # k of the first stage (timesteps)
      num_stages=2 if tiny else 3,      # K, K/2, K/4 ...
      guidance_scale=8.0,
      image_free="mdi",                 # 'mdi' (App. Alg. 1) or 'sdi' (one-step ablation)
      teacher_mode="updated",           # later stages: 'updated' (PDU) or 'fixed' (PDF)
      # Beyond the paper, as options: MCM's aDDIM teacher step and MCM's invDDIM x-target with
      # (SNR + 1) pseudo-Huber weighting (huber_eps 1 as MCM for text-to-image).
      teacher_step="ddim", target="eq7", huber_eps=1.0,
      # Stage 0 from a trajectory bank: (z_tm, z_tn) pairs made once by the guided teacher and
      # streamed (no teacher call in the step). dir '' = the teacher runs inside every step.
      bank=dict(dir="", entries=64 if tiny else 960_000),  # 960k = 40k steps x batch 24
  )
  c.train = ml_collections.ConfigDict(dict(
      steps=3 if tiny else 40_000,      # per stage
      batch_size=8 if tiny else 24, log_every=1 if tiny else 50,
      checkpoint_every=3 if tiny else 1000, keep_checkpoints=2,
      ema_decay=0.0,  # MLCM uses the stop-gradient student, no EMA
      seed=0,
      optim=dict(learning_rate=1e-4 if tiny else 1e-5, warmup_steps=0 if tiny else 100,
                 grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.0)))
  # Reward consistency + feedback learning (MLCM 3.4): '' = off, 'aesthetic' = LAION aesthetic
  # predictor on CLIP ViT-L/14 (local files). Needs the SDXL directory's VAE to decode.
  c.rewards = dict(scorer="", clip_dir="", head="", rc_weight=1.0, fl_weight=1e-3,
                   threshold=8.0)  # s0: 8.0 for the aesthetic score (2.0 for ImageReward)
  c.mesh = dict(data=-1, fsdp=1)
  c.sample = dict(num=4 if tiny else 8)
  return c


def validate(c):
  validate_train(c.train, "train")
  m = c.mlcm
  if not isinstance(m.num_segments, int) or m.num_segments < 1 or (
      m.num_segments % 2 ** (m.num_stages - 1)):
    raise ConfigError(f"config.mlcm.num_segments={m.num_segments} is invalid; allowed: an "
                      f"integer divisible by 2^(num_stages - 1) = {2 ** (m.num_stages - 1)}")
  if m.skip < 1 or m.skip >= mlcm.T // m.num_segments:
    raise ConfigError(f"config.mlcm.skip={m.skip} is invalid; allowed: 1 <= k < T/K = "
                      f"{mlcm.T // m.num_segments} (it doubles with K halving)")
  check_in(m.image_free, "mlcm.image_free", ("mdi", "sdi"))
  if m.bank.dir and (not isinstance(m.bank.entries, int) or m.bank.entries < c.train.batch_size):
    raise ConfigError(f"config.mlcm.bank.entries={m.bank.entries!r} is invalid; allowed: an "
                      f"integer >= train.batch_size={c.train.batch_size}")
  check_in(m.teacher_step, "mlcm.teacher_step", mlcm.TEACHER_STEPS)
  check_in(m.target, "mlcm.target", mlcm.TARGETS)
  check_in(m.teacher_mode, "mlcm.teacher_mode", TEACHER_MODES)
  check_in(c.rewards.scorer, "rewards.scorer", ("", "aesthetic"))
  if c.rewards.scorer and not c.student_unet:
    raise ConfigError("config.rewards.scorer needs config.student_unet: rewards score images "
                      "decoded by the SDXL directory's VAE")
  check_in(c.text_encoder, "text_encoder", ("hashed", "sdxl"))


def hashed_text_encoder(context_dim, pooled_dim, length=8, vocab=1024, seed=0):
  """A stand-in for SDXL's CLIP text encoders in tests: words -> ids by crc32 -> a fixed random
  table; ``encode(prompts) -> {'context' [B, L, D], 'text_embeds' [B, P]}`` (numpy). The empty
  prompt maps to zeros, like an unconditional embedding."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(vocab, context_dim)).astype(np.float32)
  proj = rng.normal(size=(context_dim, pooled_dim)).astype(np.float32) / np.sqrt(context_dim)

  def encode(prompts):
    context = np.zeros((len(prompts), length, context_dim), np.float32)
    for i, p in enumerate(prompts):
      ids = [zlib.crc32(w.encode()) % vocab for w in p.lower().split()][:length]
      context[i, :len(ids)] = table[ids]
    return {"context": context, "text_embeds": context.mean(1) @ proj}

  return encode


def build_models(c):
  """(model, student base params, teacher params or None, text encoder)."""
  if c.text_encoder == "sdxl" and not c.student_unet:
    raise ConfigError("config.text_encoder='sdxl' needs config.student_unet: the local SDXL "
                      "directory holding text_encoder(_2)/ and tokenizer(_2)/")
  dtype = jnp.dtype(c.dtype)
  if c.student_unet:
    model, params = sdxl.load_unet(c.student_unet, dtype)
  else:  # tiny: random weights of the tiny SDXL-architecture config
    model = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG, dtype)
    params = model.init_weights(jax.random.PRNGKey(c.seed))
  teacher = None
  if c.teacher_unet:
    t_model, teacher = sdxl.load_unet(c.teacher_unet, dtype)
    if sdxl.param_shapes(t_model).keys() != sdxl.param_shapes(model).keys():
      raise ValueError(f"config.teacher_unet={c.teacher_unet!r} is not the student's "
                       "architecture")
  if c.text_encoder == "sdxl":
    encoder = sdxl.load_text_encoders(c.student_unet)
  else:
    cfg = model.config
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    encoder = hashed_text_encoder(cfg["cross_attention_dim"], pooled, seed=c.seed)
  return model, params, teacher, encoder


def builtin_prompts():
  """20 short prompts for the tiny (hashed-text) configuration."""
  return [f"a photo of {w} {v}" for w in ("red", "green", "blue", "small", "large")
          for v in ("cat", "dog", "house", "tree")]


def stage_settings(c, stage):
  """(K, k) of a stage: K halves and k doubles each stage."""
  return c.mlcm.num_segments // 2 ** stage, c.mlcm.skip * 2 ** stage


def guided_teacher(eps_fn, params, cond, uncond, scale):
  """``teacher(z, t)``: CFG (eq. 8) of ``eps_fn(params, ...)`` with ``uncond`` ([1, ...] empty
  prompt conditioning) broadcast to the batch of ``cond``."""
  b = cond["context"].shape[0]
  uncond = jax.tree_util.tree_map(lambda u: jnp.broadcast_to(u, (b,) + u.shape[1:]), uncond)
  return lambda z, t: mlcm.guided_eps(functools.partial(eps_fn, params), z, t, cond, uncond,
                                      scale)


def make_loss(c, eps_fn, stage, decode=None, score=None):
  """``loss(lora, batch, rng, step, frozen)`` of one stage (pure; for ``train.train``).

  ``frozen``: {'unet': base params, 'teacher': teacher params (the base if absent),
  'prev_lora': the previous stage's LoRA or None, 'uncond': empty-prompt conditioning, and
  with rewards 'vae', 'scorer'}. ``decode(vae_params, latents)``, ``score(params, images)``:
  with them the loss adds ``rc_weight * L_RC + fl_weight * L_FL``.
  """
  num_segments, skip = stage_settings(c, stage)
  m = c.mlcm
  res = c.latent_resolution

  def loss(lora, batch, rng, step, frozen):
    del step
    cond = {k: batch[k] for k in ("context", "text_embeds", "time_ids")}
    b = cond["context"].shape[0]
    student_params = lora_lib.merge(frozen["unet"], lora, c.lora.scale)
    student = lambda z, t: eps_fn(student_params, z, t, cond)
    guided = guided_teacher(eps_fn, frozen.get("teacher", frozen["unet"]), cond,
                            frozen["uncond"], m.guidance_scale)
    previous = None
    if frozen.get("prev_lora") is not None:
      prev_params = lora_lib.merge(frozen["unet"], frozen["prev_lora"], c.lora.scale)
      previous = lambda z, t: eps_fn(prev_params, z, t, cond)
    if "z_tm" in batch:  # a trajectory-bank pair: no teacher call in this step
      z_tm, z_tn, t_m, t_n, start = (batch[k] for k in ("z_tm", "z_tn", "t_m", "t_n",
                                                          "seg_start"))
      return _with_rewards(student, z_tm, z_tn, t_m, t_n, start, frozen)
    k_times, k_noise = jax.random.split(rng)
    s, t_m, t_n, start = mlcm.sample_times(k_times, b, num_segments, skip)
    noise = jax.random.normal(k_noise, (b, res, res, 4))
    if previous is None:  # stage 0: the guided teacher's trajectory (App. Alg. 1)
      z_tm = mlcm.image_free_latents(m.image_free, guided, noise, s, t_m, num_segments)
    else:  # later stages: the previous MLCM's trajectory (App. Alg. 2)
      z_tm = mlcm.image_free_latents("progressive", previous, noise, s, t_m, num_segments)
    z_tm = jax.lax.stop_gradient(z_tm)
    teacher = previous if (previous is not None and m.teacher_mode == "updated") else guided
    z_tn = mlcm.teacher_step(teacher, z_tm, t_m, t_n, m.teacher_step)
    return _with_rewards(student, z_tm, z_tn, t_m, t_n, start, frozen)

  def _with_rewards(student, z_tm, z_tn, t_m, t_n, start, frozen):
    metrics = {"t_m": jnp.mean(t_m.astype(jnp.float32))}
    terms = mlcm.mlcd_terms(student, z_tm, z_tn, t_m, t_n, start)
    mlcd = jnp.mean(mlcm.objective(terms, z_tm, t_m, start, m.target, m.huber_eps))
    if score is None:
      return mlcd, metrics
    s_fn = lambda images: score(frozen["scorer"], images)
    # Reward consistency: both DDIM endpoints decoded and scored (the reference held fixed).
    rc = jnp.mean(rewards.reward_consistency(s_fn, decode(frozen["vae"], terms["pred"]),
                                             decode(frozen["vae"], terms["target"])))
    # Feedback learning on the student's one-step sample x_hat(z_{t_m}).
    fl = jnp.mean(rewards.feedback(s_fn, decode(frozen["vae"], terms["x_hat"]),
                                   c.rewards.threshold))
    metrics.update(mlcd=mlcd, reward_consistency=rc, feedback=fl)
    return mlcd + c.rewards.rc_weight * rc + c.rewards.fl_weight * fl, metrics

  return loss


def run(config, workdir):
  """All progressive stages; returns {'stages': [{'num_segments', 'skip', 'lora'}]}."""
  validate(config)
  c = config
  mesh = sharding.make_mesh(**c.mesh)
  model, params, teacher, encode = build_models(c)
  eps_fn = sdxl.make_eps_fn(model)
  if c.prompts:
    prompts = prompt_data.load_prompts(c.prompts)
  elif c.text_encoder == "hashed":
    prompts = builtin_prompts()
  else:
    raise ConfigError("config.prompts is empty; allowed: a local .txt / .jsonl / .parquet file")

  def encode_batch(texts):
    out = encode(texts)
    out["time_ids"] = sdxl.time_ids(c.latent_resolution * 8, len(texts))
    return out

  uncond = encode_batch([""])
  rep = sharding.replicated(mesh)
  frozen = {"unet": params, "uncond": jax.device_put(uncond, rep)}
  if teacher is not None:
    frozen["teacher"] = teacher
  decode = score = None
  if c.rewards.scorer:
    vae, frozen["vae"] = sdxl.load_vae(c.student_unet)
    decode = sdxl.make_decoder(vae)
    score, frozen["scorer"] = rewards.aesthetic_scorer(c.rewards.clip_dir, c.rewards.head)
  writer = create_writer(workdir)
  batch_fn = prompt_data.host_batch_fn(prompts, encode_batch, c.train.batch_size, c.seed)
  bank_fn = None
  if c.mlcm.bank.dir:
    bank = open_or_build_bank(c, frozen, eps_fn, encode_batch, prompts, mesh)
    bank_fn = bank_batch_fn(bank, prompts, encode_batch, c.train.batch_size, c.seed)
  lora_params = lora_lib.init_lora(params, c.lora.rank, jax.random.PRNGKey(c.seed + 1),
                                   tuple(c.lora.targets))
  stages = []
  for stage in range(c.mlcm.num_stages):
    num_segments, skip = stage_settings(c, stage)
    stage_dir = os.path.join(workdir, f"stage{stage}")
    from_bank = stage == 0 and bank_fn is not None
    data_spec = dict(prompts=c.prompts or "builtin", num_prompts=len(prompts),
                     global_batch=c.train.batch_size, seed=c.seed,
                     bank=c.mlcm.bank.dir if from_bank else "")
    state = train.train(make_loss(c, eps_fn, stage, decode, score), lora_params, None, c.train,
                        stage_dir, frozen=frozen, writer=writer,
                        name=f"mlcm_stage{stage}_K{num_segments}",
                        mesh=mesh, host_batch_fn=bank_fn if from_bank else batch_fn,
                        data_spec=data_spec)
    lora_params = jax.device_get(state.params)  # no EMA in MLCM: the trained LoRA itself
    frozen = dict(frozen, prev_lora=lora_params)
    path = None
    if jax.process_index() == 0:
      path = lora_lib.save(os.path.join(stage_dir, "lora"), lora_params, c.lora.scale)
      _write_sample_grid(c, model, params, lora_params, eps_fn, encode_batch, prompts,
                         num_segments, stage_dir)
    stages.append({"num_segments": num_segments, "skip": skip, "lora": path})
    logging.info("MLCM stage %d (K=%d, k=%d) done: %s", stage, num_segments, skip, path)
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "stages.json"), "w") as f:
      json.dump(stages, f, indent=1)
  return {"stages": stages}


def bank_settings(c):
  return dict(teacher=c.teacher_unet or c.student_unet or "tiny-random", seed=c.seed,
              num_segments=c.mlcm.num_segments, skip=c.mlcm.skip,
              guidance_scale=c.mlcm.guidance_scale, image_free=c.mlcm.image_free,
              teacher_step=c.mlcm.teacher_step,
              latent_resolution=c.latent_resolution, prompts=c.prompts or "builtin",
              entries=c.mlcm.bank.entries, batch=c.train.batch_size)


def open_or_build_bank(c, frozen, eps_fn, encode_batch, prompts, mesh):
  """The stage-0 trajectory bank in ``c.mlcm.bank.dir``: reused if its settings match, else
  built by the guided teacher (one jitted, sharded call per batch of ``train.batch_size``)."""
  directory, settings = c.mlcm.bank.dir, bank_settings(c)
  if os.path.isdir(directory) and any(p.startswith("meta_p") for p in os.listdir(directory)):
    return trajectory_bank.Bank(directory, settings)
  m, res, b = c.mlcm, c.latent_resolution, c.train.batch_size
  teacher_params = frozen.get("teacher", frozen["unet"])
  teacher_params = jax.device_put(teacher_params,
                                  sharding.tree_shardings(teacher_params, mesh))
  uncond = frozen["uncond"]

  @jax.jit
  def make_pairs(params, batch, rng):
    cond = {k: batch[k] for k in ("context", "text_embeds", "time_ids")}
    n = cond["context"].shape[0]
    guided = guided_teacher(eps_fn, params, cond, uncond, m.guidance_scale)
    k_times, k_noise = jax.random.split(rng)
    s, t_m, t_n, start = mlcm.sample_times(k_times, n, m.num_segments, m.skip)
    noise = jax.random.normal(k_noise, (n, res, res, 4))
    z_tm = mlcm.image_free_latents(m.image_free, guided, noise, s, t_m, m.num_segments)
    z_tn = mlcm.teacher_step(guided, z_tm, t_m, t_n, m.teacher_step)
    return dict(prompt_index=batch["prompt_index"], segment=s, t_m=t_m, t_n=t_n,
                seg_start=start, z_tm=z_tm, z_tn=z_tn)

  indices = local_indices_fn(b, len(prompts), c.seed + 777)

  def batches():
    for i in range(-(-m.bank.entries // b)):
      idx = indices(i)
      host = dict(encode_batch([prompts[j] for j in idx]), prompt_index=idx.astype(np.int32))
      yield make_pairs(teacher_params, sharding.shard_batch(host, mesh),
                       jax.random.fold_in(jax.random.PRNGKey(c.seed + 555), i))

  n = trajectory_bank.write(directory, settings, batches())
  if jax.process_count() > 1:  # every host's shards are on the shared filesystem before reading
    multihost_utils.sync_global_devices("trajectory_bank_written")
  logging.info("trajectory bank: %d entries on this process -> %s", n, directory)
  return trajectory_bank.Bank(directory, settings)


def bank_batch_fn(bank, prompts, encode_batch, global_batch, seed):
  """``batch(step)``: bank entries of the step (epoch permutation) + their prompts' encoding."""
  indices = local_indices_fn(global_batch, len(bank), seed)

  def batch(step):
    entries = bank.get(indices(step))
    out = encode_batch([prompts[i] for i in entries["prompt_index"]])
    out.update({k: entries[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")})
    return out

  return batch


def _write_sample_grid(c, model, params, lora_params, eps_fn, encode_batch, prompts, steps,
                       stage_dir):
  """K-step samples of the merged student: images through the SDXL directory's VAE if it has
  one (``samples_<K>step.png``), else the latents' first 3 channels (``latents_<K>step.png``)."""
  n = c.sample.num
  cond = jax.tree_util.tree_map(jnp.asarray, encode_batch(prompts[:n]))
  merged = lora_lib.merge(params, lora_params, c.lora.scale)
  noise = jax.random.normal(jax.random.PRNGKey(c.seed + 99),
                            (len(prompts[:n]), c.latent_resolution, c.latent_resolution, 4))
  if c.student_unet and os.path.isdir(os.path.join(c.student_unet, "vae")):
    vae, vae_params = sdxl.load_vae(c.student_unet)
    images = generate.make_generator(model, vae, steps)(merged, vae_params, cond, noise)
    plotting.image_grid(os.path.join(stage_dir, f"samples_{steps}step.png"), np.asarray(images))
    return
  z = jax.jit(lambda p, nz, cd: mlcm.consistency_sample(
      lambda zz, t: eps_fn(p, zz, t, cd), nz, steps))(merged, noise, cond)
  latents = np.asarray(z[..., :3])
  plotting.image_grid(os.path.join(stage_dir, f"latents_{steps}step.png"),
                      np.clip(latents / (np.abs(latents).max() + 1e-8), -1, 1))
