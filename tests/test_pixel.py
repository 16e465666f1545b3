"""Pixel MCM on the tiny path (UViT tiny, digits 16x16): base training, CD / CT from it, errors."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet64_base, imagenet64_cd, imagenet64_ct, imagenet128_base, imagenet128_cd
from mcm_jax import checkpoint, diffusion, fid, objectives
from mcm_jax.experiments import pixel, pixel_sampling
from mcm_jax.config_validation import validate
from mcm_jax.errors import ConfigError
from mcm_jax.data import images as image_data


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  config = imagenet64_base.get_config("tiny")
  config.sample.x_var_data = 64  # aDDIM's x_var table from 64 images (the config: 256)
  config.p_uncond = 0.2  # labels dropped: the null label's branch is trained for guidance
  return config, workdir, pixel.run(config, workdir)


def _eval_loss(config, params):
  _, logsnr_fn, denoise = objectives.uvit_model(config)
  x, y = image_data.load_digits(16)
  batch = {"x": jnp.asarray(x[:256]), "label": jnp.asarray(y[:256])}
  loss = jax.jit(functools.partial(diffusion.diffusion_loss, denoise_fn=denoise,
                                   logsnr_fn=logsnr_fn))
  return np.mean([float(loss(params, batch, jax.random.PRNGKey(k), 0)[0]) for k in range(8)])


@pytest.mark.slow  # base_run: a tiny UViT base training (about a minute on 2 cores)
def test_tiny_uvit_base_training_lowers_the_loss(base_run):
  config, workdir, result = base_run
  model, _, _ = objectives.uvit_model(config)
  init = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, 16, 16, 1)),
                             jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  trained, _ = checkpoint.load_ema_params(workdir, init)  # partial restore of ema_params
  assert _eval_loss(config, trained) < 0.75 * _eval_loss(config, init)
  assert all(os.path.getsize(p) > 100 for p in result["samples"])
  table = json.load(open(os.path.join(workdir, "x_var_table.json")))
  assert len(table["t"]) == config.sample.x_var_points == len(table["x_var"])
  # Posterior variance per dim: ~0 at low noise, growing with t, bounded by eta * Var[x].
  x, _ = image_data.load_digits(16)
  assert table["x_var"][0] < 0.05 * table["x_var"][-1]
  assert table["x_var"][-1] <= 0.75 * float(np.var(x)) * 1.5


def _null_row(params, num_classes=10):
  return np.asarray(params["params"]["Embed_0"]["embedding"][num_classes])


@pytest.mark.slow  # two compiles of the tiny UViT's gradient (about 25 s on 2 cores)
def test_label_dropout_trains_the_null_label_and_only_it():
  config = imagenet64_base.get_config("tiny")
  model, logsnr_fn, denoise = objectives.uvit_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)),
                               jnp.zeros((1,), jnp.int32))
  leaves, tree = jax.tree_util.tree_flatten(params)  # off the zero-initialised output layer,
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))  # which blocks every other gradient
  params = tree.unflatten([p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x, y = image_data.load_digits(16)
  batch = {"x": jnp.asarray(x[:64]), "label": jnp.asarray(y[:64])}
  grads = {}
  for p in (0.0, 0.5):
    config.p_uncond = p
    loss = objectives.pixel_loss(config, denoise, logsnr_fn)
    grads[p] = jax.jit(jax.grad(lambda q: loss(q, batch, jax.random.PRNGKey(1), 0)[0]))(params)
  assert not np.any(_null_row(grads[0.0]))  # no dropout: the null embedding gets no gradient
  assert np.linalg.norm(_null_row(grads[0.5])) > 1e-3
  dropped = diffusion.drop_labels(jnp.zeros(20_000, jnp.int32), jax.random.PRNGKey(2), 0.1, 10)
  assert set(np.unique(dropped)) == {0, 10} and abs(np.mean(dropped == 10) - 0.1) < 0.01


def test_guidance_needs_a_trained_null_label(tmp_path):
  config = imagenet64_base.get_config("tiny")
  config.sample.guidance_scale = 2.0
  with pytest.raises(ConfigError, match=r"guidance_scale=2.0 needs a trained unconditional.*"
                     r"config.p_uncond=0.0"):
    validate(config)
  config.p_uncond = 1.0
  with pytest.raises(ConfigError, match=r"config.p_uncond=1.0 is invalid; allowed: .*\[0, 1\)"):
    validate(config)
  config = imagenet64_cd.get_config("tiny")
  config.init_from, config.sample.guidance_scale = "runs/base", 2.0
  with pytest.raises(ConfigError, match=r"guidance_scale=2.0 is invalid for objective='cd'"):
    validate(config)
  base128 = imagenet128_base.get_config("tiny")  # ImageNet128's base trains the null label
  assert base128.p_uncond == 0.1 and base128.sample.guidance_scale == 1.5
  validate(base128)
  teacher = tmp_path / "teacher"  # a base run trained without dropout cannot guide CD
  teacher.mkdir()
  (teacher / "config.json").write_text(json.dumps({"objective": "base", "p_uncond": 0.0}))
  config = imagenet128_cd.get_config("tiny")
  config.data.resolution, config.init_from = 16, str(teacher)
  assert config.consistency.guidance_scale == 1.5
  with pytest.raises(ConfigError, match=r"consistency.guidance_scale=1.5 is invalid for the "
                     r"teacher.*p_uncond=0.0.*untrained"):
    pixel.run(config, str(tmp_path / "cd"))


@pytest.mark.slow  # base_run, then guided and unguided samples
def test_guided_sampling_is_cfg_on_the_trained_null_branch(base_run):
  config, workdir, _ = base_run
  _, logsnr_fn, denoise, like = pixel.build(config, None)
  trained, _ = checkpoint.load_ema_params(workdir, like)
  model, _, _ = objectives.uvit_model(config)
  init = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, 16, 16, 1)),
                             jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  assert np.linalg.norm(_null_row(trained) - _null_row(init)) > 1e-3  # p_uncond trained it
  z = jax.random.normal(jax.random.PRNGKey(3), (8, 16, 16, 1))
  labels = jnp.arange(8) % 10
  samples = {}
  for w in (1.0, 3.0):
    guided = config.copy_and_resolve_references()
    guided.sample.guidance_scale = w
    samplers = pixel_sampling.make_samplers(guided, denoise, logsnr_fn)
    samples[w] = samplers.sample(trained, z, labels, 1, "analytic")  # one step: x_hat(z_1)
  t = jnp.ones(8)
  x_c = denoise(trained, z, t, labels)
  x_u = denoise(trained, z, t, jnp.full(8, 10))
  np.testing.assert_allclose(samples[1.0], x_c, atol=1e-5)
  np.testing.assert_allclose(samples[3.0], x_u + 3.0 * (x_c - x_u), atol=1e-4)
  assert float(jnp.mean(jnp.abs(samples[3.0] - samples[1.0]))) > 1e-2
  evaluated = config.copy_and_resolve_references()
  evaluated.sample.guidance_scale, evaluated.sample.sampler = 3.0, "dpmpp_2m"
  evaluated.eval.num, evaluated.eval.batch_size, evaluated.eval.steps = 128, 128, (2,)
  row = pixel.evaluate(evaluated, workdir)["results"][0]
  assert row["sampler"] == "dpmpp_2m_2_w3" and row["guidance_scale"] == 3.0


@pytest.mark.slow  # base_run, then a CD / CT run end to end
@pytest.mark.parametrize("config_module", [imagenet64_cd, imagenet64_ct])
def test_tiny_cd_and_ct_from_the_base_run(base_run, tmp_path, config_module):
  _, base_workdir, _ = base_run
  config = config_module.get_config("tiny")
  config.init_from = base_workdir
  config.train.steps = 10
  result = pixel.run(config, str(tmp_path))
  assert os.path.basename(result["samples"][0]).startswith(f"samples_{config.objective}_4_")
  metrics = open(tmp_path / "metrics.jsonl").read()
  assert f"{config.objective}/loss" in metrics and "NaN" not in metrics


@pytest.mark.slow  # base_run, then a CD run whose student sees its segment position
def test_a_segment_aware_cd_student_starts_as_its_base_and_trains(base_run, tmp_path):
  """``model.segment_input``: the student (the base's parameters plus a zero-initialised segment
  embedding) computes the base model's function at the start, learns an embedding that makes
  the two sides of a segment boundary differ, and evaluates with it."""
  config_base, base_workdir, _ = base_run
  config = imagenet64_cd.get_config("tiny")
  config.init_from, config.model.segment_input = base_workdir, True
  config.train.steps = 10
  _, logsnr_fn, student, like = pixel.build(config, None)
  assert "segment_embed" in like["params"]
  base = checkpoint.load_ema_params(base_workdir, pixel.base_params(like))[0]
  _, _, plain = objectives.uvit_model(config_base)
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 like["params"]["segment_embed"])
  start = {"params": {**base["params"], "segment_embed": zeros}}
  z, labels = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1)), jnp.arange(4)
  t = jnp.array([0.25, 0.25 + 1e-3, 0.5, 0.9])  # 0.25: a boundary of the 4-step student
  np.testing.assert_array_equal(student(start, z, t, labels), plain(base, z, t, labels))
  pixel.run(config, str(tmp_path))
  trained, _ = checkpoint.load_ema_params(str(tmp_path), like)
  assert np.abs(np.asarray(trained["params"]["segment_embed"]["kernel"])).max() > 0
  blind = {"params": {**trained["params"], "segment_embed": zeros}}
  assert float(jnp.abs(student(trained, z, t, labels) - student(blind, z, t, labels)).max()) > 0
  config.eval.num, config.eval.batch_size, config.eval.reference_num = 64, 64, 256
  row = pixel.evaluate(config, str(tmp_path))["results"][0]
  assert row["sampler"] == "cd_4" and np.isfinite(row["fd"])


@pytest.mark.slow  # needs base_run's checkpoint
def test_teacher_errors_name_the_path_and_the_parameter(base_run, tmp_path):
  _, base_workdir, _ = base_run
  config = imagenet64_cd.get_config("tiny")
  config.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.init_from=.*missing.*no checkpoints/"):
    pixel.run(config, str(tmp_path / "a"))
  config = imagenet128_cd.get_config("tiny")  # one more stage: a different parameter tree
  config.data.resolution = 16
  config.init_from = base_workdir
  with pytest.raises(ValueError, match=r"ema_params.*(missing|lacks|shape)"):
    pixel.run(config, str(tmp_path / "b"))


def test_pixel_config_errors():
  config = imagenet64_cd.get_config("tiny")
  config.objective = "pd"
  with pytest.raises(ConfigError, match=r"config.objective='pd'.*\('base', 'cd', 'ct'\)"):
    validate(config)
  config = imagenet64_cd.get_config("tiny")
  config.init_from = ""
  with pytest.raises(ConfigError, match="config.init_from is empty"):
    validate(config)
  config = imagenet64_base.get_config("tiny")
  config.sample.x_var = "exact"
  with pytest.raises(ConfigError, match=r"config.sample.x_var='exact'.*'table', 'analytic'"):
    validate(config)
  config = imagenet64_cd.get_config("tiny")
  config.consistency.student_steps = 0
  with pytest.raises(ConfigError, match=r"consistency.student_steps=0 is invalid"):
    validate(config)
  config = imagenet64_base.get_config("small")
  with pytest.raises(ConfigError, match=r"data.data_dir='' is invalid for data.name='imagenet2012'"):
    validate(config)
  with pytest.raises(FileNotFoundError, match=r"data_dir='/nonexistent' is not a directory"):
    image_data.load("imagenet2012", 64, "/nonexistent")
  config = imagenet64_base.get_config("tiny")
  config.eval.features = "clip"
  with pytest.raises(ConfigError, match=r"config.eval.features='clip'.*'inception'"):
    validate(config)
  for module in (imagenet64_base, imagenet64_cd, imagenet64_ct, imagenet128_cd):
    for size in ("small", "large"):
      c = module.get_config(size)
      assert c.train.batch_size == 2048 and c.consistency.xvar_frac == 0.75
      assert c.consistency.huber_eps == 1e-4 and c.consistency.teacher_steps_end == 1280


def test_multiscale_loss_adds_the_pooled_error():
  x = jnp.zeros((4, 8, 8, 1))
  checker = jnp.where((jnp.arange(8)[:, None] + jnp.arange(8)[None]) % 2 == 0, 1.0, -1.0)
  denoise = lambda p, z, t, c, r: jnp.broadcast_to(checker[None, :, :, None], z.shape)
  kw = dict(denoise_fn=denoise, logsnr_fn=lambda t: jnp.zeros_like(t))  # w = SNR + 1 = 2
  plain = diffusion.diffusion_loss(None, {"x": x}, jax.random.PRNGKey(0), 0, **kw)[0]
  multi = diffusion.diffusion_loss(None, {"x": x}, jax.random.PRNGKey(0), 0,
                                   multiscale_levels=1, **kw)[0]
  np.testing.assert_allclose(plain, 2.0)          # error 1 everywhere
  np.testing.assert_allclose(multi, 0.5 * (2.0 + 0.0))  # the checkerboard pools to 0


@pytest.mark.slow  # base_run, then sampling and FD at two step counts
def test_eval_mode_measures_fd_per_step_count(base_run):
  config, workdir, _ = base_run
  config = config.copy_and_resolve_references()
  config.eval.num, config.eval.batch_size, config.eval.steps = 256, 128, (2, 16)
  result = pixel.evaluate(config, workdir)
  rows = {r["steps"]: r for r in result["results"]}
  assert set(rows) == {2, 16} and all(r["num"] == 256 for r in rows.values())
  assert os.path.isfile(os.path.join(workdir, "reference_digits_classifier.npz"))
  # The briefly trained base model is far from the data but far closer than noise is.
  mu, sigma = fid.load_statistics(os.path.join(workdir, "reference_digits_classifier.npz"))
  noise = np.random.default_rng(0).uniform(-1, 1, (256, 16, 16, 1)).astype(np.float32)
  feats, _ = fid.batched_features(fid.digits_feature_fn(), noise, 128)
  noise_fd = fid.frechet_distance(*fid.statistics(feats), mu, sigma)
  assert all(0 < r["fd"] < noise_fd for r in rows.values()), (rows, noise_fd)
  assert all(0 <= r["class_accuracy"] <= 1 for r in rows.values())
  saved = json.load(open(os.path.join(workdir, f"eval_step{result['checkpoint_step']}.json")))
  assert saved["results"][0]["fd"] == rows[2]["fd"]


@pytest.mark.slow  # base_run, then a CD run end to end
def test_periodic_sample_grids_during_training(base_run, tmp_path):
  _, base_workdir, _ = base_run
  config = imagenet64_cd.get_config("tiny")
  config.init_from = base_workdir
  config.train.update(steps=20, log_every=5, checkpoint_every=10)
  config.sample.every = 10
  pixel.run(config, str(tmp_path))
  grids = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
  assert grids == ["samples_cd_4_step10.png", "samples_cd_4_step20.png"]
  config.sample.every = 7
  with pytest.raises(ConfigError, match="sample.every=7.*multiple of train.log_every=5"):
    pixel.run(config, str(tmp_path / "x"))
