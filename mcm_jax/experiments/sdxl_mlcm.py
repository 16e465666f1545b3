"""The SDXL MLCM experiment (``configs/sdxl_mlcm.py``): distil an SDXL-architecture UNet into a
LoRA, or into a whole UNet (``config.trainable``), by MLCD (the method: ``mcm_jax.mlcm``) on the
one training loop (``train.train``: the LoRA or the student UNet is the trained state; the
teacher's weights are ``frozen``; both sharded over the mesh), with progressive stages
K -> K/2, k -> 2k and image-free data from teacher trajectories.

Each stage is its own run in ``workdir/stage<i>`` (restore-or-init; finished stages are reused)
that starts from the previous stage's student and exports its own: a LoRA in diffusers' layout,
``workdir/stage<i>/lora/pytorch_lora_weights.safetensors``, or a full student as a diffusers
UNet directory, ``workdir/stage<i>/unet/`` (float16; with ``mlcm.guidance_range`` the
guidance-conditioned UNet of LCM §4.2, ``time_cond_proj_dim`` in its config). Stage 0 may read
its training pairs from a trajectory bank (``mlcm.bank.dir``) made once by the guided teacher.
"""
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import (guidance, hub, lora, mlcm, objectives, pipeline, scorers, seeds, sharding,
                     storage, train)
from mcm_jax import rewards as rewards_lib
from mcm_jax.config_validation import validate
from mcm_jax.data import image_captions, latent_cache, trajectory_bank
from mcm_jax.data import prompts as prompt_data
from mcm_jax.data.loader import local_indices_fn
from mcm_jax.errors import ConfigError, UserError
from mcm_jax.experiments import Step
from mcm_jax.metric_writer import create_writer
from mcm_jax.models import sdxl, sdxl_text


def build_models(c):
  """(UNet model, student base params, teacher params or None, text encoder); loaded UNet
  weights are read straight into ``config.unet.frozen_dtype`` (float32 for a full-UNet student,
  whose trained copy starts from them). With ``mlcm.guidance_range`` the model is the
  guidance-conditioned student's (``sdxl.with_guidance_embedding``), which also computes the
  teacher from the base parameters."""
  if c.text_encoder == "sdxl" and not c.student_unet:
    raise ConfigError("config.text_encoder='sdxl' needs config.student_unet: the local SDXL "
                      "directory holding text_encoder(_2)/ and tokenizer(_2)/")
  unet = unet_options(c)
  if c.student_unet:
    model, params = sdxl.load_unet(c.student_unet, **unet, param_dtype=base_dtype(c))
  else:  # tiny: random weights of the tiny SDXL-architecture config
    model = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG, **unet)
    params = model.init_weights(jax.random.PRNGKey(c.seed))
  teacher = None
  if c.teacher_unet:
    t_model, teacher = sdxl.load_unet(c.teacher_unet, **unet, param_dtype=c.unet.frozen_dtype)
    if sdxl.param_shapes(t_model).keys() != sdxl.param_shapes(model).keys():
      raise UserError(f"config.teacher_unet={c.teacher_unet!r} is not the student's "
                      "architecture")
  if c.text_encoder == "sdxl":
    encoder = sdxl_text.load_text_encoders(c.student_unet)
  else:
    encoder = sdxl_text.hashed_text_encoder_for(model, seed=c.seed)
  return guidance_model(c, model), params, teacher, encoder


def base_dtype(c):
  """The dtype the student's UNet weights are read into: ``unet.frozen_dtype``, float32 when
  the whole UNet is trained."""
  return "float32" if c.trainable == "unet" else c.unet.frozen_dtype


def guidance_model(c, model):
  """``model``, or with ``mlcm.guidance_range`` the guidance-conditioned student's UNet
  (``unet.time_cond_proj_dim``)."""
  if not c.mlcm.guidance_range:
    return model
  return sdxl.with_guidance_embedding(model, c.unet.time_cond_proj_dim)


def unet_options(c):
  """The UNet's compute dtype, rematerialisation and attention (``config.dtype``, ``config.unet``)
  as keyword arguments of ``sdxl.unet_from_config`` / ``sdxl.load_unet``."""
  return dict(dtype=jnp.dtype(c.dtype), remat=c.unet.remat, attention=c.unet.attention)


def unet_config(c):
  """The UNet's diffusers config: ``config.student_unet``'s ``unet/config.json`` when it is a
  local directory, SDXL base's (``sdxl.SDXL_BASE_UNET_CONFIG``) for any other name, the tiny
  one when it is empty."""
  if not c.student_unet:
    return sdxl.TINY_UNET_CONFIG
  if os.path.isdir(c.student_unet):
    return sdxl.read_json(os.path.join(sdxl.component_dir(c.student_unet, "unet"), "config.json"))
  logging.info("config.student_unet=%r is not a local directory: SDXL base's UNet config",
               c.student_unet)
  return sdxl.SDXL_BASE_UNET_CONFIG


def abstract_models(c):
  """``build_models`` as shapes, for ``--mode=plan``: parameters are ShapeDtypeStructs of the
  UNet of ``unet_config`` (``jax.eval_shape``: nothing allocated, no weights read); the text
  encoder is the hashed one or zeros of SDXL's CLIP output shapes."""
  model = sdxl.unet_from_config(unet_config(c), **unet_options(c))
  params = jax.eval_shape(model.init_weights, jax.random.PRNGKey(c.seed))
  params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype(c)), params)
  teacher = params if c.teacher_unet else None
  if c.text_encoder == "sdxl":
    encoder = sdxl_text.zeros_text_encoder(model)
  else:
    encoder = sdxl_text.hashed_text_encoder_for(model, seed=c.seed)
  return guidance_model(c, model), params, teacher, encoder


# Prompt embeddings up to this size are computed once and the CLIP text encoders freed
# (SDXL: 77 x 2048 + 1280 float32 per prompt, ~0.6 MB: about 1,700 prompts per GiB).
EMBEDDING_CACHE_BYTES = 1 << 30


def cached_encoder(encode, prompts, budget=EMBEDDING_CACHE_BYTES, batch=8):
  """``encode`` itself, or, when the embeddings of ``prompts`` and "" fit in ``budget`` bytes, a
  lookup of them computed once (in batches of ``batch``), so that nothing holds the text
  encoders' weights any more (``encode(texts)`` then takes only those texts)."""
  texts = sorted(set(prompts) | {""})
  one = encode([""])
  if len(texts) * sum(v.nbytes for v in one.values()) > budget:
    return encode
  parts = [encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
  table = {k: np.concatenate([p[k] for p in parts]) for k in one}
  row = {t: i for i, t in enumerate(texts)}
  return lambda batch_texts: {k: v[[row[t] for t in batch_texts]] for k, v in table.items()}


def conditioning_fn(c, encode, reward_tokenize=None):
  """``encode_batch(texts)``: ``encode``'s prompt embeddings plus SDXL's size conditioning
  ``time_ids`` at ``c.latent_resolution`` (what every batch holds), and with
  ``reward_tokenize`` (a prompt-conditioned reward scorer's) 'reward_ids' / 'reward_mask'."""
  def encode_batch(texts):
    out = encode(texts)
    out["time_ids"] = sdxl.time_ids(c.latent_resolution * 8, len(texts))
    if reward_tokenize is not None:
      out["reward_ids"], out["reward_mask"] = reward_tokenize(texts)
    return out
  return encode_batch


def reward_scorer(c, abstract=False):
  """The ``scorers.Scorer`` of ``config.rewards.scorer``: the LAION aesthetic predictor (no
  prompt), ImageReward, or several (``scorers.combine``: scores [B, S]). ``abstract``: on
  shapes, for ``--mode=plan``: each scorer's configured files where they are on this machine,
  else its published architecture (``scorers.abstract_scorer``)."""
  r = c.rewards
  named = {}
  for name, local in reward_sources(c).items():
    if name == "imagereward":
      load = lambda: scorers.load_imagereward(r.imagereward_dir, r.tokenizer_dir or None)
    else:
      load = lambda: scorers.load_aesthetic(r.clip_dir, r.head)
    if not abstract:
      named[name] = load()
    elif local == "published":
      named[name] = scorers.abstract_scorer(name)
    else:
      scorer = load()
      named[name] = dataclasses.replace(scorer, params=jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), scorer.params))
  return next(iter(named.values())) if len(named) == 1 else scorers.combine(named)


def reward_sources(c):
  """{scorer name: 'files' (its configured files are on this machine) or 'published' (they are
  not: ``--mode=plan`` plans the published architecture)}."""
  r, out = c.rewards, {}
  for name in rewards_lib.scorer_names(r.scorer):
    if name == "imagereward":
      local = os.path.isfile(os.path.join(r.imagereward_dir, "ImageReward.pt"))
    else:
      local = os.path.isdir(r.clip_dir) and os.path.isfile(r.head)
    out[name] = "files" if local else "published"
  return out


def frozen_cast(c, tree):
  """``tree`` (arrays or ShapeDtypeStructs) in ``config.unet.frozen_dtype``."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, c.unet.frozen_dtype)
      if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x, c.unet.frozen_dtype), tree)


def frozen_inputs(c, params, teacher, uncond):
  """The train step's ``frozen`` tree of stage 0 (``mlcm.loss``): the UNet, the unconditional
  conditioning and a separate teacher's UNet if there is one; the UNets' weights are kept in
  ``config.unet.frozen_dtype`` (bfloat16 halves their memory; the LoRA stays float32). A
  full-UNet student keeps one frozen UNet, the teacher (``teacher``, else the base)."""
  if c.trainable == "unet":
    return {"unet": frozen_cast(c, params if teacher is None else teacher), "uncond": uncond}
  frozen = {"unet": frozen_cast(c, params), "uncond": uncond}
  if teacher is not None:
    frozen["teacher"] = frozen_cast(c, teacher)
  return frozen


def init_lora(c, params):
  """A fresh LoRA (``config.lora``: rank, targets) on the target kernels of ``params``."""
  return lora.init_lora(params, c.lora.rank, seeds.key(c.seed, "lora_init"),
                        tuple(c.lora.targets))


def starting_student(c, model, params):
  """Stage 0's trainable tree: the LoRA (``starting_lora``) or, with ``trainable='unet'``, the
  whole UNet ``model``'s parameters in float32 from ``params`` (with ``mlcm.guidance_range`` a
  zero guidance projection added: the student starts as the base's function)."""
  if c.trainable == "lora":
    return starting_lora(c, params)
  if c.mlcm.guidance_range:
    params = sdxl.zero_guidance_projection(model, params)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def starting_lora(c, params):
  """Stage 0's LoRA: ``init_lora``, or the file ``lora.init_from`` (e.g. a distilled student
  for LCF), which must have the same modules and rank; its B is divided by ``lora.scale`` so
  that the student starts equal to the base with that file attached at scale 1."""
  if not c.lora.init_from:
    return init_lora(c, params)
  loaded = lora.load(c.lora.init_from, params)
  shapes = lambda tree: {k: (tuple(v["a"].shape), tuple(v["b"].shape)) for k, v in tree.items()}
  got, want = shapes(loaded), shapes(jax.eval_shape(lambda p: init_lora(c, p), params))
  if got != want:
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    first = next((k for k in sorted(want.keys() & got.keys()) if got[k] != want[k]), None)
    raise UserError(
        f"config.lora.init_from={c.lora.init_from!r} does not match config.lora (rank="
        f"{c.lora.rank}, targets={tuple(c.lora.targets)}): "
        + (f"modules missing from the file: {missing[:3]}; " if missing else "")
        + (f"modules not in the targets: {extra[:3]}; " if extra else "")
        + (f"{first}: (A, B) shapes {got[first]} in the file, {want[first]} configured; "
           if first else "")
        + "set lora.rank / lora.targets to the file's")
  return {k: {"a": jnp.asarray(v["a"], jnp.float32),
              "b": jnp.asarray(v["b"], jnp.float32) / c.lora.scale} for k, v in loaded.items()}


def batch_shapes(c, encode_batch, stage=0):
  """ShapeDtypeStructs of one global batch of stage ``stage``: the conditioning of
  ``encode_batch``; from images, their latents (cached) or the images; and, when the stage reads
  the trajectory bank (``objectives.mlcm_reads_bank``), the pair it streams
  (``trajectory_bank.batch_fn``, shapes of ``mlcm.training_pair``)."""
  b, res = c.train.batch_size, c.latent_resolution
  batch = {k: jax.ShapeDtypeStruct((b,) + np.shape(x)[1:],  # as on device: float64 is float32
                                   jax.dtypes.canonicalize_dtype(x.dtype))
           for k, x in encode_batch([""]).items()}  # one prompt encoded, its rows' shapes kept
  if c.mlcm.source == "images":
    batch.update({"latents": jax.ShapeDtypeStruct((b, res, res, 4), jnp.float32)}
                 if c.images.cache_dir else
                 {"image": jax.ShapeDtypeStruct((b, image_resolution(c), image_resolution(c), 3),
                                                 jnp.float32)})
  if objectives.mlcm_reads_bank(c, stage):
    identity = lambda z, t: z
    pair = jax.eval_shape(lambda rng: mlcm.training_pair(
        rng, (b, res, res, 4), objectives.mlcm_hparams(c, 0), identity, identity),
                          jax.random.PRNGKey(0))
    batch.update({k: pair[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")})
  return batch


def image_resolution(c):
  """The training images' size: ``latent_resolution`` times the SDXL directory's VAE factor."""
  return c.latent_resolution * sdxl.vae_scale_factor(c.student_unet)


REMAT_FIELD = "unet.remat"


def num_stages(c):
  """The progressive stages K -> K/2 -> ... (``mlcm.num_stages``)."""
  return c.mlcm.num_stages


def previous_student(c, trained):
  """The previous stage's student as the next stage's ``frozen['previous']``: the LoRA as
  trained, a full UNet in ``unet.frozen_dtype``."""
  return frozen_cast(c, trained) if c.trainable == "unet" else trained


def step(c, stage, denoise, params, frozen, student, encode_batch, decode=None, score=None,
         encode=None):
  """The train step of stage ``stage`` (``objectives.mlcm_loss``): ``student`` (the LoRA on the
  UNet ``params``, or the whole UNet; ``denoise``: ``sdxl.make_denoiser``) is trained;
  ``frozen`` (``frozen_inputs``, plus the previous stage's student ``previous`` from stage 1) is
  not. ``forward`` is one student forward on the batch at t = 500; ``decode`` / ``score`` are
  the reward losses' VAE decoder and scorer, ``encode`` the VAE encoder of uncached images."""
  adapt = objectives.student_params_fn(c)

  def forward(p, frozen, b):
    res, cond = c.latent_resolution, {k: b[k] for k in mlcm.CONDITIONING}
    z = jnp.zeros((b["context"].shape[0], res, res, 4))
    return denoise(adapt(frozen["unet"], p), z, jnp.full(z.shape[:1], 500.), cond)

  return Step(loss=objectives.mlcm_loss(c, denoise, stage, decode, score, encode),
              params=student,
              frozen=frozen, batch=batch_shapes(c, encode_batch, stage), model_params=params,
              forward=forward,
              report=dict(stage=stage, from_bank=objectives.mlcm_reads_bank(c, stage),
                          **({"scorers": reward_sources(c)} if c.rewards.scorer else {})))


def abstract_step(c, stage=0):
  """``step`` of stage ``stage`` as ``run`` builds it, on shapes (``abstract_models``; the
  previous stage's student stands in by its shapes): what ``--mode=plan`` compiles."""
  model, params, teacher, encode = abstract_models(c)
  scorer = reward_scorer(c, abstract=True) if c.rewards.scorer else None
  encode_batch = conditioning_fn(c, encode, scorer and scorer.tokenize)
  frozen = frozen_inputs(c, params, teacher, unconditional(c, encode_batch))
  decode = encode_images = None
  encodes = c.mlcm.source == "images" and not c.images.cache_dir  # the step encodes the images
  if scorer or encodes:
    vae, frozen["vae"] = sdxl.abstract_vae(c.student_unet)
    decode = sdxl.make_decoder(vae) if scorer else None
    encode_images = sdxl.make_encoder(vae) if encodes else None
  if scorer:
    frozen["scorer"] = scorer.params
  if c.trainable == "lora":  # the shapes of a fresh LoRA (lora.init_from is not read)
    student = jax.eval_shape(lambda p: init_lora(c, p), params)
  else:
    student = jax.eval_shape(lambda p: starting_student(c, model, p), params)
  if stage > 0:
    frozen = dict(frozen, previous=previous_student(c, student))
  return step(c, stage, sdxl.make_denoiser(model), params, frozen, student, encode_batch,
              decode, scorer and scorer.score, encode_images)


def uncond_mode(c):
  """'zeros' or 'empty_prompt': ``mlcm.uncond``, with 'auto' read from the SDXL directory."""
  if c.mlcm.uncond != "auto":
    return c.mlcm.uncond
  return "zeros" if sdxl_text.force_zeros_for_empty_prompt(c.student_unet) else "empty_prompt"


def unconditional(c, encode_batch):
  """The guided teacher's unconditional conditioning [1, ...] (eq. 8): zero prompt embeddings
  or the text encoders' embedding of "" (``uncond_mode``); the size conditioning is kept."""
  out = sdxl_text.unconditional(encode_batch, uncond_mode(c) == "zeros")
  return {k: out[k] for k in mlcm.CONDITIONING}


def bank_settings(c):
  """What a stage-0 trajectory bank depends on (checked when it is reused)."""
  return dict(teacher=c.teacher_unet or c.student_unet or "tiny-random", seed=c.seed,
              num_segments=c.mlcm.num_segments, skip=c.mlcm.skip,
              guidance_scale=c.mlcm.guidance_scale, uncond=uncond_mode(c),
              image_free=c.mlcm.source,
              teacher_step=c.mlcm.teacher_step,
              # named only when not DDIM, so banks made before the option existed still match
              **({"trajectory_step": c.mlcm.trajectory_step}
                 if c.mlcm.trajectory_step != "ddim" else {}),
              latent_resolution=c.latent_resolution, prompts=c.prompts or "builtin",
              entries=c.mlcm.bank.entries, batch=c.train.batch_size)


def open_or_build_bank(c, frozen, denoise, encode_batch, prompts, mesh):
  """The stage-0 trajectory bank in ``c.mlcm.bank.dir``: reused if its settings match, else
  built by the guided teacher (``mlcm.training_pair``, one jitted sharded call per batch)."""
  hp, res, b = objectives.mlcm_hparams(c, 0), c.latent_resolution, c.train.batch_size
  teacher_params = frozen.get("teacher", frozen["unet"])
  teacher_params = sharding.put(teacher_params, sharding.tree_shardings(teacher_params, mesh))

  @jax.jit
  def make_pairs(params, batch, rng):
    cond = {k: batch[k] for k in mlcm.CONDITIONING}
    guided = mlcm.guided_denoiser(denoise, params, cond, frozen["uncond"], hp.guidance_scale)
    with sharding.tracing_on(mesh):  # the noise and the UNet's activations split by batch
      pair = mlcm.training_pair(rng, (cond["context"].shape[0], res, res, 4), hp, guided, guided)
    return dict(pair, prompt_index=batch["prompt_index"])

  indices = local_indices_fn(b, len(prompts), seeds.entropy(c.seed, "bank_prompts"))

  def batches():
    for i in range(-(-c.mlcm.bank.entries // b)):
      idx = indices(i)
      host = dict(encode_batch([prompts[j] for j in idx]), prompt_index=idx.astype(np.int32))
      yield make_pairs(teacher_params, sharding.shard_batch(host, mesh),
                       jax.random.fold_in(seeds.key(c.seed, "bank_noise"), i))

  return trajectory_bank.open_or_build(c.mlcm.bank.dir, bank_settings(c), batches)


def image_batch_fn(c, images, encode_batch, encode_images, vae_params, mesh):
  """The host batch function of an image run: captions' conditioning plus the images, or
  their latents from ``images.cache_dir`` (built first if absent by ``encode_images`` with
  ``vae_params``; ``latent_cache``)."""
  if not c.images.cache_dir:
    return image_captions.host_batch_fn(images, encode_batch, c.train.batch_size, c.seed,
                                        **c.images.reading)
  vae_params, jitted = sharding.put(vae_params, sharding.replicated(mesh)), jax.jit(
      encode_images)
  encode = lambda x: jitted(vae_params, x)
  cache = latent_cache.open_or_build(c.images.cache_dir, images, encode, c.student_unet,
                                     c.train.batch_size, mesh)
  return image_captions.host_batch_fn(cache, encode_batch, c.train.batch_size, c.seed,
                                      key="latents", **c.images.reading)


def resolve_model_paths(config):
  """A copy of ``config`` whose model fields (student / teacher UNet, reward models) are local
  directories: hub names (org/name) resolved from the local Hugging Face cache (``hub``)."""
  c = config.copy_and_resolve_references()
  for section, field in ((c, "student_unet"), (c, "teacher_unet"), (c.rewards, "clip_dir"),
                         (c.rewards, "imagereward_dir"), (c.rewards, "tokenizer_dir")):
    if section[field]:
      section[field] = hub.local_path(section[field], f"config.{field}" if section is c
                                      else f"config.rewards.{field}")
  return c


def run(config, workdir):
  """All progressive stages; returns {'stages': [{'num_segments', 'skip', 'lora' or 'unet'}]}
  (the exported student's file, ``export_student``)."""
  validate(config)
  c = resolve_model_paths(config)
  mesh = sharding.make_mesh(**c.mesh)
  images = None
  if c.mlcm.source == "images":  # the folder's captions are the prompts; listed before loading
    images = image_captions.open_source(c.images, image_resolution(c))
  model, params, teacher, encode = build_models(c)
  denoise = sdxl.make_denoiser(model)
  if images is not None:
    prompts = images.captions
  elif c.prompts:
    prompts = prompt_data.load_prompts(c.prompts)
  elif c.text_encoder == "hashed":
    prompts = prompt_data.builtin_prompts()
  else:
    raise ConfigError("config.prompts is empty; allowed: a local .txt / .jsonl / .parquet file")

  if c.text_encoder == "sdxl":
    encode = cached_encoder(encode, prompts)  # frees the CLIP weights when the prompts are few
  decode = score = scorer = encode_images = vae_params = None
  if c.rewards.scorer:
    scorer = reward_scorer(c)
    score = scorer.score
  encode_batch = conditioning_fn(c, encode, scorer and scorer.tokenize)
  frozen = frozen_inputs(c, params, teacher, sharding.put(unconditional(c, encode_batch),
                                                       sharding.replicated(mesh)))
  if c.rewards.scorer or images is not None:
    vae, vae_params = sdxl.load_vae(c.student_unet)
    decode, encode_images = sdxl.make_decoder(vae), sdxl.make_encoder(vae)
  if c.rewards.scorer:
    frozen["scorer"] = scorer.params
  writer = create_writer(workdir)
  if images is not None:
    batch_fn = image_batch_fn(c, images, encode_batch, encode_images, vae_params, mesh)
    if c.images.cache_dir:
      encode_images = None  # the step reads cached latents
  else:
    batch_fn = prompt_data.host_batch_fn(prompts, encode_batch, c.train.batch_size, c.seed)
  if c.rewards.scorer or encode_images is not None:  # the step decodes or encodes
    frozen["vae"] = vae_params
  bank_fn = None
  if c.mlcm.bank.dir:
    bank = open_or_build_bank(c, frozen, denoise, encode_batch, prompts, mesh)
    bank_fn = trajectory_bank.batch_fn(bank, prompts, encode_batch, c.train.batch_size, c.seed)
  student = starting_student(c, model, params)
  adapt = objectives.student_params_fn(c)
  stages = []
  for stage in range(c.mlcm.num_stages):
    hp = objectives.mlcm_hparams(c, stage)
    stage_dir = os.path.join(workdir, f"stage{stage}")
    from_bank = objectives.mlcm_reads_bank(c, stage)
    data_spec = dict(prompts=c.prompts or "builtin", num_prompts=len(prompts),
                     global_batch=c.train.batch_size, seed=c.seed,
                     bank=c.mlcm.bank.dir if from_bank else "")
    if images is not None:  # named only for image runs, so prompt runs' checkpoints still match
      data_spec.update(prompts="", images=images.directory)
    trained = step(c, stage, denoise, params, frozen, student, encode_batch, decode, score,
                   encode_images)
    state = train.train(trained.loss, trained.params, None, c.train, stage_dir,
                        frozen=trained.frozen, writer=writer,
                        name=f"mlcm_stage{stage}_K{hp.num_segments}", mesh=mesh,
                        host_batch_fn=bank_fn if from_bank else batch_fn, data_spec=data_spec)
    student = state.params  # no EMA in MLCM: the trained student itself, on the devices
    frozen = dict(frozen, previous=previous_student(c, student))
    trained_here = host_copy(student)  # every process takes part in the gather
    path = None
    if jax.process_index() == 0:
      path = export_student(c, model, trained_here, stage_dir,
                            f"mlcm_stage{stage}_K{hp.num_segments}")
      _write_stage_grid(c, model, adapt(frozen["unet"], trained_here), encode_batch, prompts,
                        hp.num_segments, stage_dir)
    stages.append({"num_segments": hp.num_segments, "skip": hp.skip, c.trainable: path})
    logging.info("MLCM stage %d (K=%d, k=%d) done: %s", stage, hp.num_segments, hp.skip, path)
  if images is not None:
    batch_fn.close()  # the image reader's threads and worker processes
  writer.close()
  if jax.process_index() == 0:
    storage.write_json(os.path.join(workdir, "stages.json"), stages)
  return {"stages": stages}


def host_copy(tree):
  """``tree``'s arrays as numpy on this host; arrays spread over several processes (a full UNet
  sharded over fsdp across hosts) are all-gathered first, so every process must call it."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def export_student(c, model, student, stage_dir, name):
  """Writes a stage's student: the LoRA (``lora.save``: diffusers' PEFT and kohya files in
  ``stage_dir/lora``) or the whole UNet as a diffusers UNet directory ``stage_dir/unet``
  (``sdxl.save_unet``, float16); returns the diffusers file's path."""
  if c.trainable == "unet":
    return sdxl.save_unet(os.path.join(stage_dir, "unet"), model, student, "float16")
  return lora.save(os.path.join(stage_dir, "lora"), student, c.lora.scale, name,
                   c.lora.kohya_dtype)


def _write_stage_grid(c, model, student, encode_batch, prompts, steps, stage_dir):
  """K-step samples of the student (the base with its LoRA attached, or the full UNet; a
  guidance-conditioned one at ``mlcm.guidance_scale``), decoded by the SDXL directory's VAE if
  it has one."""
  n = c.sample.num
  cond = jax.tree_util.tree_map(jnp.asarray, encode_batch(prompts[:n]))
  if c.mlcm.guidance_range:
    cond["timestep_cond"] = guidance.scale_embedding(
        jnp.full((len(prompts[:n]),), c.mlcm.guidance_scale - 1.0), c.unet.time_cond_proj_dim)
  noise = jax.random.normal(seeds.key(c.seed, "sample_grid"),
                            (len(prompts[:n]), c.latent_resolution, c.latent_resolution, 4))
  vae = vae_params = None
  if c.student_unet and os.path.isdir(os.path.join(c.student_unet, "vae")):
    vae, vae_params = sdxl.load_vae(c.student_unet)
  pipeline.write_sample_grid(stage_dir, model, student, cond, noise, steps, vae, vae_params)
