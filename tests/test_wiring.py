"""The runners' composed losses (``objectives``: config -> loss) against the published formulas
computed by hand: MCM Alg. 1 (pixel CT / CD with a guided teacher) and MLCM eq. 7-8 written in
the paper's epsilon form (stage 0 MDI / SDI, later stages with the PDU and PDF teacher, a
trajectory-bank batch, real latents with the guided teacher and LCF). Every config field the loss reads is set to a non-default value, so a
field mapped to the wrong argument shows."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet64_cd, imagenet64_ct, sdxl_mlcm
from mcm_jax import consistency, guidance, lora, mlcm, objectives, schedules, scorers, seeds
from mcm_jax.data import images as image_data
from mcm_jax.models import sdxl, sdxl_text
from mcm_jax.samplers import addim
import sdxl_fixtures  # tests/


def _perturbed(params, key, scale=0.05):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def pixel_setup():
  config = imagenet64_cd.get_config("tiny")
  model, logsnr_fn, denoise = objectives.uvit_model(config)
  inputs = [jnp.zeros(x.shape, x.dtype) for x in objectives.uvit_inputs(config)]
  student = jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)
  teacher = _perturbed(student, jax.random.PRNGKey(1))
  x, y = image_data.load_digits(16)
  batch = {"x": jnp.asarray(x[:8]), "label": jnp.asarray(y[:8])}
  return logsnr_fn, denoise, student, teacher, batch


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
@pytest.mark.parametrize("objective,sampler", [("cd", "addim"), ("cd", "ddim"), ("ct", None)])
def test_pixel_loss_is_algorithm_1_by_hand(pixel_setup, objective, sampler):
  logsnr_fn, denoise, params, teacher, batch = pixel_setup
  config = (imagenet64_cd if objective == "cd" else imagenet64_ct).get_config("tiny")
  cc = config.consistency
  cc.update(student_steps=2, teacher_steps_start=8, teacher_steps_end=32,
            teacher_steps_horizon=40, xvar_frac=0.5, huber_eps=0.03, guidance_scale=2.5,
            loss_weight="sqrt_snr_plus_one", teacher_sampler=sampler or "addim")
  step, rng = 10, jax.random.PRNGKey(3)
  loss, _ = objectives.pixel_loss(config, denoise, logsnr_fn)(params, batch, rng, step, teacher)

  x, labels = batch["x"], batch["label"]
  n = x.shape[0]
  n_teacher = np.exp(np.log(8) + (10 / 40) * (np.log(32) - np.log(8)))  # annealed steps
  rng_t, rng_eps, rng_model = jax.random.split(rng, 3)
  t, s, t_step = consistency.sample_times(rng_t, n, 2, n_teacher)
  eps = jax.random.normal(rng_eps, x.shape)
  coef = lambda u: schedules.alpha_sigma(logsnr_fn(u))
  (a_t, s_t), (a_s, s_s), (a_k, s_k) = coef(t), coef(s), coef(t_step)
  b = lambda v: v[:, None, None, None]
  z_t = b(a_t) * x + b(s_t) * eps
  if objective == "cd":
    x_c = denoise(teacher, z_t, t, labels, None)
    x_u = denoise(teacher, z_t, t, jnp.full_like(labels, 10), None)  # null label = num_classes
    x_teacher = x_u + 2.5 * (x_c - x_u)
    x_var = (0.5 * jnp.mean((x_c - x) ** 2, axis=(1, 2, 3)) if sampler == "addim"
             else jnp.zeros(n))
  else:
    x_teacher, x_var = x, jnp.zeros(n)
  z_s = addim.addim_step(x_teacher, z_t, a_t, s_t, a_s, s_s, x_var)
  x_ref = denoise(params, z_s, s, labels, rng_model)
  z_ref = b(a_k) * x_ref + b(s_k / s_s) * (z_s - b(a_s) * x_ref)  # DDIM_{s -> t_step}
  x_target = (z_ref - b(s_k / s_t) * z_t) / b(a_k - a_t * s_k / s_t)  # invDDIM_{t -> t_step}
  x_hat = denoise(params, z_t, t, labels, rng_model)
  dist = jnp.sqrt(jnp.mean((x_hat - x_target) ** 2, axis=(1, 2, 3)) + 0.03 ** 2) - 0.03
  weight = jnp.sqrt(jnp.exp(logsnr_fn(t)) + 1)
  np.testing.assert_allclose(loss, jnp.mean(weight * dist), rtol=2e-5)


# --- MLCM: the paper's epsilon form on the discrete schedule's own alphabar table.
ALPHAS, SIGMAS = (np.asarray(v, np.float64) for v in schedules.sdxl_alphas_sigmas())


def _ddim_eps(z, eps, t, s, s_clean):
  """``alpha_s (z - sigma_t eps) / alpha_t + sigma_s eps`` for one example (numpy)."""
  a_s, s_s = (1.0, 0.0) if s_clean else (ALPHAS[s], SIGMAS[s])
  return a_s * (z - SIGMAS[t] * eps) / ALPHAS[t] + s_s * eps


@pytest.fixture(scope="module")
def mlcm_setup():
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.update(num_segments=4, skip=30, guidance_scale=3.0)
  config.lora.scale = 0.7
  model = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG)
  params = model.init_weights(jax.random.PRNGKey(0))
  lora0 = _perturbed(lora.init_lora(params, 2, jax.random.PRNGKey(1)), jax.random.PRNGKey(2), 0.3)
  lora1 = _perturbed(lora0, jax.random.PRNGKey(3), 0.3)
  encode = sdxl_text.hashed_text_encoder_for(model)
  prompts = ["a red cat", "a blue tree", "small dog", "a large house"]
  cond = encode(prompts)
  cond["time_ids"] = sdxl.time_ids(64, 4)
  uncond = encode([""])
  uncond["time_ids"] = sdxl.time_ids(64, 1)
  eps_net = jax.jit(sdxl.make_eps_fn(model))
  one = lambda tree, i: jax.tree_util.tree_map(lambda v: v[i:i + 1], tree)

  def eps(p, z, t, i, c=None):  # one example's epsilon, numpy float64
    out = eps_net(p, jnp.asarray(z[None], jnp.float32), jnp.array([t]), one(c or cond, i))
    return np.asarray(out[0], np.float64)

  return config, model, params, lora0, lora1, cond, uncond, eps


def _by_hand(config, params, lora0, lora1, cond, uncond, eps, stage, rng, bank=None,
             latents=None, scales=None, student_cond=None):
  """Per-example MLCD of one stage, with every step written out in epsilon form; ``latents``:
  real latents z_0 noised to z_{t_m} (LCM Alg. 1), and with ``teacher_step='data'`` to z_{t_n}
  with the same noise (LCF, LCM Alg. 4). ``lora0`` / ``lora1``: the previous and the trained
  student's LoRA, or with ``trainable='unet'`` their whole UNets; ``scales``: each example's
  teacher guidance scale (default ``mlcm.guidance_scale``), ``student_cond``: the students'
  conditioning (default the batch's)."""
  m = config.mlcm
  K, k = m.num_segments // 2 ** stage, m.skip * 2 ** stage
  merged = ((lambda l: l) if config.trainable == "unet" else
            (lambda l: lora.attach(params, l, config.lora.scale)))
  student = merged(lora1 if stage else lora0)
  previous = merged(lora0) if stage else None
  w = np.full(4, m.guidance_scale) if scales is None else np.asarray(scales, np.float64)
  student_eps = lambda p, z, t, i: eps(p, z, t, i, student_cond)

  def guided(z, t, i):
    e_c, e_u = eps(params, z, t, i), eps(params, z, t, 0, uncond)
    return e_u + w[i] * (e_c - e_u)

  if bank is None:
    k_times, k_noise = jax.random.split(rng)
    seg, t_m, t_n, start = (np.asarray(v) for v in mlcm.sample_times(k_times, 4, K, k))
    noise = np.asarray(jax.random.normal(k_noise, (4, 8, 8, 4)), np.float64)
  else:
    seg = None
    t_m, t_n, start = (np.asarray(bank[key]) for key in ("t_m", "t_n", "seg_start"))
  losses, ends = [], []
  for i in range(4):
    if bank is not None:
      z_tm, z_tn = (np.asarray(bank[key][i], np.float64) for key in ("z_tm", "z_tn"))
    elif latents is not None:
      z0 = np.asarray(latents[i], np.float64)
      z_tm = ALPHAS[t_m[i]] * z0 + SIGMAS[t_m[i]] * noise[i]
      if m.teacher_step == "data":
        z_tn = ALPHAS[t_n[i]] * z0 + SIGMAS[t_n[i]] * noise[i]
      else:
        z_tn = _ddim_eps(z_tm, guided(z_tm, t_m[i], i), t_m[i], t_n[i], False)
    else:
      if stage == 0:
        source = guided
        n_steps = 1 if m.source == "sdi" else K - seg[i]
        size = (999 - t_m[i]) / n_steps
      else:  # App. Alg. 2: steps of T / (2K) with the previous MLCM
        source = lambda z, t, j: student_eps(previous, z, t, j)
        size = 1000 / (2 * K)
        n_steps = int(np.ceil((999 - t_m[i]) / size))
      z = noise[i]
      for j in range(n_steps):
        t = int(np.round(999 - j * size))
        if t <= t_m[i]:
          break
        nxt = max(int(np.round(999 - (j + 1) * size)), int(t_m[i]))
        z = _ddim_eps(z, source(z, t, i), t, nxt, False)
      z_tm = z
      use_previous = stage > 0 and m.teacher_mode == "updated"
      e_teacher = (student_eps(previous, z_tm, t_m[i], i) if use_previous
                   else guided(z_tm, t_m[i], i))
      z_tn = _ddim_eps(z_tm, e_teacher, t_m[i], t_n[i], False)
    clean = start[i] == 0
    pred = _ddim_eps(z_tm, student_eps(student, z_tm, t_m[i], i), t_m[i], start[i], clean)
    if t_n[i] == start[i] and not clean:
      target = z_tn
    else:
      target = _ddim_eps(z_tn, student_eps(student, z_tn, t_n[i], i), t_n[i], start[i], clean)
    losses.append(np.mean((pred - target) ** 2))
    ends.append((pred, target))
  return np.mean(losses), ends


def _bank_pair(seed):
  """A trajectory-bank batch of 4: random latents, one example per segment (K = 4, k = 30);
  example 0 ends at the clean latent, the others on their segment start or inside it."""
  rng = np.random.default_rng(seed)
  return {"z_tm": rng.normal(size=(4, 8, 8, 4)).astype(np.float32),
          "z_tn": rng.normal(size=(4, 8, 8, 4)).astype(np.float32),
          "t_m": np.array([140, 300, 620, 999], np.int32),
          "t_n": np.array([110, 250, 590, 969], np.int32),
          "seg_start": np.array([0, 250, 500, 750], np.int32)}


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
@pytest.mark.parametrize("stage,variant", [(0, "mdi"), (0, "sdi"), (1, "updated"),
                                           (1, "fixed"), (0, "bank"), (0, "images"),
                                           (1, "lcf")])
def test_mlcm_loss_is_eq7_by_hand(mlcm_setup, stage, variant):
  config, model, params, lora0, lora1, cond, uncond, eps = mlcm_setup
  config = config.copy_and_resolve_references()
  if variant in ("mdi", "sdi"):
    config.mlcm.source = variant
  elif variant in ("updated", "fixed"):
    config.mlcm.teacher_mode = variant
  frozen = {"unet": params, "uncond": uncond, "previous": lora0 if stage else None}
  batch = dict(cond)
  bank = latents = encode = None
  if variant == "bank":  # a stored pair: no teacher call, only the student's terms
    bank = _bank_pair(seed=0)
    batch.update(bank)
  if variant in ("images", "lcf"):  # real latents: encoded in the step, or cached ones (LCF)
    config.mlcm.source = "images"
    images = np.random.default_rng(5).normal(size=(4, 8, 8, 4)).astype(np.float32)
    latents = 0.6 * images
    if variant == "images":  # the guided teacher's step from the noised latents
      encode, frozen["vae"] = (lambda p, x: p * x), 0.6  # a stand-in VAE encoder
      batch["image"] = images
    else:  # LCF: no teacher; the previous stage's LoRA is unused
      config.mlcm.teacher_step = "data"
      batch["latents"] = latents
  rng = jax.random.PRNGKey(7)
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), stage, encode=encode)
  loss, metrics = jax.jit(loss_fn)(lora1 if stage else lora0, batch, rng, 0, frozen)
  expected, _ = _by_hand(config, params, lora0, lora1, cond, uncond, eps, stage, rng, bank,
                         latents)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
  assert expected > 0


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
@pytest.mark.parametrize("stage", [0, 1])
def test_guidance_conditioned_full_student_loss_by_hand(mlcm_setup, stage):
  """LCM §4.2 with MLCD (``trainable='unet'``, ``guidance_range``): each example's teacher is
  guided at its own w ~ U[w_min, w_max], and the whole-UNet student -- and at stage 1 the
  previous stage's student, which makes the latents and the PDU teacher step -- is called with
  ``timestep_cond = scale_embedding(w - 1)`` (diffusers' ``get_guidance_scale_embedding``, tested
  in test_sdxl) through its ``cond_proj``; the teacher is the base UNet without it."""
  config, _, params, _, _, cond, uncond, _ = mlcm_setup
  config = config.copy_and_resolve_references()
  config.trainable = "unet"
  config.mlcm.guidance_range = (3.0, 15.0)
  config.unet.time_cond_proj_dim = 8
  model = sdxl.with_guidance_embedding(sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG), 8)
  start = sdxl.zero_guidance_projection(model, params)
  assert not np.any(start["time_embedding"]["cond_proj"]["kernel"])
  students = [_perturbed(start, jax.random.PRNGKey(s), 0.05) for s in (11, 12)]  # cond_proj != 0
  eps_net = jax.jit(sdxl.make_eps_fn(model))
  one = lambda tree, i: jax.tree_util.tree_map(lambda v: v[i:i + 1], tree)

  def eps(p, z, t, i, c=None):
    out = eps_net(p, jnp.asarray(z[None], jnp.float32), jnp.array([t]), one(c or cond, i))
    return np.asarray(out[0], np.float64)

  rng = jax.random.PRNGKey(7 + stage)
  hp = objectives.mlcm_hparams(config, stage)
  w, embedding = mlcm.sample_guidance(
      jax.random.fold_in(rng, seeds.stream_id("guidance_scale")), 4, hp)
  assert np.all((3.0 <= np.asarray(w)) & (np.asarray(w) <= 15.0)) and np.ptp(w) > 1.0
  frozen = {"unet": params, "uncond": uncond, "previous": students[0] if stage else None}
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), stage)
  loss, _ = jax.jit(loss_fn)(students[1] if stage else students[0], dict(cond), rng, 0, frozen)
  student_cond = dict(cond, timestep_cond=guidance.scale_embedding(np.asarray(w) - 1.0, 8))
  expected, _ = _by_hand(config, params, students[0], students[1], cond, uncond, eps, stage, rng,
                         scales=w, student_cond=student_cond)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
  # the embedding matters, and at stage 0 the per-example teacher scale (at stage 1 the PDU
  # teacher is the previous student: w reaches it only through the embedding)
  unembedded, _ = _by_hand(config, params, students[0], students[1], cond, uncond, eps, stage,
                           rng, scales=w)
  assert abs(unembedded - expected) > 1e-3 * expected
  if stage == 0:
    fixed, _ = _by_hand(config, params, students[0], students[1], cond, uncond, eps, stage, rng,
                        scales=np.full(4, 9.0), student_cond=student_cond)
    assert abs(fixed - expected) > 1e-3 * expected


@pytest.mark.slow  # traces SDXL's block structure twice (forward and gradient), ~15 s
def test_reward_gradient_keeps_no_stacked_copy_of_the_frozen_weights():
  """The reward step's gradient at SDXL's block structure (depths 1 / 2 / 10) with float16
  frozen weights and float32 compute: no forward scan hands its backward pass a residual shaped
  as a stacked transformer weight. Feedback learning differentiates through the student's
  sample; as a differentiated ``lax.scan`` over steps, it made JAX keep every block's weights
  cast to float32; the unrolled sampler keeps none."""
  config = sdxl_mlcm.get_config("tiny")
  config.rewards.update(scorer="aesthetic", fl_weight=1.0)
  model = sdxl.unet_from_config(sdxl_fixtures.sdxl_structure_config(), jnp.float32, "full")
  shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float16), shapes)
  trainable = lora.init_lora(params, 2, jax.random.PRNGKey(1))
  cond = {"context": jnp.ones((4, 77, 32)), "text_embeds": jnp.ones((4, 32)),
          "time_ids": sdxl.time_ids(64, 4)}
  uncond = jax.tree.map(lambda v: v[:1], cond)
  frozen = {"unet": params, "uncond": uncond, "previous": None, "vae": 1.5, "scorer": 4.0}
  decode = lambda p, z: jnp.tanh(p * z[..., :3])
  score = lambda p, x, tokens: jnp.mean(p * x, axis=(1, 2, 3))
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0, decode, score)
  batch = dict(cond, **_bank_pair(seed=1))
  grad = jax.make_jaxpr(jax.grad(lambda l: loss_fn(l, batch, jax.random.PRNGKey(2), 0,
                                                   frozen)[0]))(trainable)
  stacked = {s.shape for s in jax.tree.leaves(shapes) if len(s.shape) == 3 and s.shape[0] > 1}
  assert (10, 128, 1024) in stacked  # the 10-deep stacks' GEGLU projections, among others

  def residuals(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan" and not eqn.params["reverse"]:
        yield from (v.aval.shape for v in eqn.outvars if v.aval.shape in stacked)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from residuals(sub)

  found = list(residuals(grad.jaxpr))
  assert not found, f"stacked weights kept for the backward pass: {found[:4]}"


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_mlcm_loss_with_rewards_by_hand(mlcm_setup):
  """Reward consistency on the decoded DDIM endpoints of eq. 7 and feedback learning on the
  student's one-step sample from fresh noise (fold_in(rng, 1)), with a stand-in decoder and a
  prompt-conditioned scorer whose parameters come through ``frozen`` as the VAE's and the
  scorer's do and whose tokens come per example from the batch ('reward_ids', 'reward_mask')."""
  config, model, params, lora0, lora1, cond, uncond, eps = mlcm_setup
  config = config.copy_and_resolve_references()
  config.rewards.update(scorer="imagereward", rc_weight=0.5, fl_weight=0.25, threshold=(3.0,),
                        fl_steps=1)
  decode = lambda p, z: jnp.tanh(p * z[..., :3])
  # A prompt-conditioned stand-in (as ImageReward): the example's tokens shift its score.
  score = lambda p, x, tokens: 2.0 + jnp.mean(p * x, axis=(1, 2, 3)) + 0.5 * jnp.sum(
      tokens[0] * tokens[1], axis=1)
  frozen = {"unet": params, "uncond": uncond, "previous": None, "vae": 1.5, "scorer": 4.0}
  bank = _bank_pair(seed=1)
  ids = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 0], [5, 0, 0]], np.int32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], np.int32)
  key = jax.random.PRNGKey(3)
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0, decode, score)
  loss, metrics = jax.jit(loss_fn)(lora0, dict(cond, reward_ids=ids, reward_mask=mask, **bank),
                                   key, 0, frozen)
  mlcd, ends = _by_hand(config, params, lora0, lora1, cond, uncond, eps, 0, key, bank)
  prompt_term = 0.5 * np.sum(ids * mask, axis=1)  # [2, 1, 0, 2.5]: some hinges close
  s_np = lambda z, i: 2.0 + np.mean(4.0 * np.tanh(1.5 * z[..., :3])) + prompt_term[i]
  rc = np.mean([(s_np(p, i) - s_np(t, i)) ** 2 for i, (p, t) in enumerate(ends)])
  student = lora.attach(params, lora0, config.lora.scale)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8, 4)), np.float64)
  x_0 = [(noise[i] - SIGMAS[999] * eps(student, noise[i], 999, i)) / ALPHAS[999]
         for i in range(4)]  # one step from z_999: x_hat
  hinges = [max(3.0 - s_np(x, i), 0.0) for i, x in enumerate(x_0)]
  fl = np.mean(hinges)
  assert rc > 0 and fl > 0 and min(hinges) == 0.0  # per-example tokens decide which are open
  np.testing.assert_allclose(float(metrics["reward_consistency"]), rc, rtol=2e-4)
  np.testing.assert_allclose(float(metrics["feedback"]), fl, rtol=2e-4)
  np.testing.assert_allclose(float(loss), mlcd + 0.5 * rc + 0.25 * fl, rtol=2e-4)

  # Two scorers (MLCM's ImageReward + aesthetic, ``scorers.combine``): each loss is the sum of
  # the scorers' terms, each hinge with its own s0.
  config.rewards.update(scorer="imagereward+aesthetic", threshold=(3.0, 2.5))
  prompt_free = lambda p, x, tokens: jnp.mean(jnp.abs(p * x), axis=(1, 2, 3))
  both = scorers.combine({"imagereward": scorers.Scorer(score, None, tokenize=lambda t: t),
                          "aesthetic": scorers.Scorer(prompt_free, None)})
  frozen2 = dict(frozen, scorer={"imagereward": 4.0, "aesthetic": 2.0})
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0, decode, both.score)
  loss2, metrics2 = jax.jit(loss_fn)(lora0, dict(cond, reward_ids=ids, reward_mask=mask, **bank),
                                     key, 0, frozen2)
  a_np = lambda z: np.mean(np.abs(2.0 * np.tanh(1.5 * z[..., :3])))
  rc2 = rc + np.mean([(a_np(p) - a_np(t)) ** 2 for p, t in ends])
  fl2 = np.mean([max(3.0 - s_np(x, i), 0.0) + max(2.5 - a_np(x), 0.0)
                 for i, x in enumerate(x_0)])
  assert fl2 > fl  # the second hinge is open
  np.testing.assert_allclose(float(metrics2["reward_consistency"]), rc2, rtol=2e-4)
  np.testing.assert_allclose(float(metrics2["feedback"]), fl2, rtol=2e-4)
  np.testing.assert_allclose(float(loss2), mlcd + 0.5 * rc2 + 0.25 * fl2, rtol=2e-4)
  # Feedback learning from stage 1 on: stage 0 has none (nothing sampled, no 'feedback').
  config.rewards.fl_from_stage = 1
  loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0, decode, both.score)
  loss3, metrics3 = jax.jit(loss_fn)(lora0, dict(cond, reward_ids=ids, reward_mask=mask, **bank),
                                     key, 0, frozen2)
  assert "feedback" not in metrics3
  np.testing.assert_allclose(float(loss3), mlcd + 0.5 * rc2, rtol=2e-4)
  assert objectives.reward_hparams(config, 1).fl_weight == 0.25
  # The decoder recomputed in the backward pass (the default, checked by hand above) or stored:
  # the gradient's program differs by one remat around each decode (RC's two, FL's one).
  config.rewards.fl_from_stage = 0
  batch = dict(cond, reward_ids=ids, reward_mask=mask, **bank)
  remats = {}
  for remat in (True, False):
    config.rewards.remat_decoder = remat
    loss_fn = objectives.mlcm_loss(config, sdxl.make_denoiser(model), 0, decode, both.score)
    grad_fn = jax.grad(lambda l, f=loss_fn: f(l, batch, key, 0, frozen2)[0])
    remats[remat] = str(jax.make_jaxpr(grad_fn)(lora0)).count("remat2[")
  assert remats == {True: 3, False: 0}
