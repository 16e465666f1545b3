import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import imagenet64_base, imagenet64_cd, imagenet64_ct
from configs import imagenet128_base, imagenet128_cd, imagenet128_ct, sdxl_mlcm
from configs import toy as toy_config
from mcm_jax.config_validation import validate
from mcm_jax.errors import ConfigError
from mcm_jax.data import toy as toy_data
from mcm_jax.evaluation import energy_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PIXEL_CONFIGS = (imagenet64_base, imagenet64_cd, imagenet64_ct, imagenet128_base,
                 imagenet128_cd, imagenet128_ct)


def _with_data_dir(config):
  if config.experiment == "pixel" and config.data.name != "digits":
    config.data.data_dir = "/data/tfds"  # the paper sizes need a local data dir
  return config


@pytest.mark.parametrize(
    "module,sizes",
    [(toy_config, (None, "tiny")), (sdxl_mlcm, ("sdxl", "tiny"))]
    + [(m, ("small", "large", "tiny")) for m in PIXEL_CONFIGS],
    ids=["toy", "sdxl_mlcm"] + [m.__name__.split(".")[-1] for m in PIXEL_CONFIGS])
def test_every_config_and_size_is_valid(module, sizes):
  for size in sizes:
    validate(_with_data_dir(module.get_config() if size is None else module.get_config(size)))
  with pytest.raises(ValueError, match=r"'huge'.*allowed.*'tiny'"):
    module.get_config("huge")


def test_unknown_experiment_is_a_config_error():
  config = toy_config.get_config("tiny")
  config.experiment = "gan"
  with pytest.raises(ConfigError, match=r"experiment='gan' is invalid; allowed: \('toy', "
                     r"'pixel', 'mlcm'\)"):
    validate(config)


def test_config_files_import_only_ml_collections_and_configs():
  names = ["toy", "sdxl_mlcm"] + [m.__name__.split(".")[-1] for m in PIXEL_CONFIGS]
  code = (f"import sys; from configs import {', '.join(names)}; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('mcm_jax', 'jax', 'flax', 'optax', 'orbax', 'numpy')))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=True)
  assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("field,value,message", [
    ("sweep.student_steps", (0, 2), r"sweep.student_steps=\(0, 2\).*integers >= 1"),
    ("consistency.teacher_steps_start", 8, r"teacher_steps_start=8.*largest student step"),
    ("consistency.xvar_frac", -0.5, r"xvar_frac=-0.5.*>= 0"),
    ("sweep.methods", ("ct", "pd"), r"sweep.methods=\('ct', 'pd'\)"),
    ("data.name", "spiral9", r"data.name='spiral9'.*checkerboard"),
    ("schedule.name", "linear", r"schedule.name='linear'.*cosine"),
    ("student.checkpoint_every", 7, r"checkpoint_every=7.*multiple of student.log_every"),
    ("eval.num_samples", 1000, r"num_samples=1000.*multiple of 1024"),
])
def test_invalid_configs_name_field_value_and_allowed(field, value, message):
  config = toy_config.get_config()
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_main_rejects_a_bad_config_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mcm_jax.main", "--config=configs/toy.py:tiny",
       "--config.sweep.student_steps=(0,)", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.sweep.student_steps=(0,)" in proc.stderr
  assert not os.path.exists(tmp_path / "config.json")  # validated before anything is written


@pytest.mark.parametrize("name", sorted(toy_data.DATASETS))
def test_toy_samplers_shapes_and_scale(name):
  x = toy_data.get_sampler(name)(jax.random.PRNGKey(0), 4096)
  assert x.shape == (4096, 1 if name == "mixture1d" else 2)
  assert 0.3 < float(np.std(x)) < 2.0


def test_as_sampler_accepts_arrays_and_iterables():
  data = np.random.RandomState(0).randn(500, 3).astype(np.float32)
  from_array = toy_data.as_sampler(data)(jax.random.PRNGKey(0), 64)
  from_iter = toy_data.as_sampler(iter([data[:250], data[250:]]))(jax.random.PRNGKey(0), 64)
  assert from_array.shape == (64, 3)
  np.testing.assert_array_equal(from_array, from_iter)
  assert all(any(np.array_equal(r, d) for d in data) for r in np.asarray(from_array))
  with pytest.raises(ValueError, match=r"\[N, D\].*\(5,\)"):
    toy_data.as_sampler(np.zeros(5))


def test_energy_distance_matches_brute_force_and_separates():
  rng = np.random.RandomState(0)
  x, y = rng.randn(1024, 2), rng.randn(1024, 2) + 0.3
  d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)
  n = len(x)
  brute = (2 * d(x, y).mean() - d(x, x).sum() / (n * n - n) - d(y, y).sum() / (n * n - n))
  np.testing.assert_allclose(float(energy_distance(x, y)), brute, rtol=1e-3)
  same = float(energy_distance(rng.randn(4096, 2), rng.randn(4096, 2)))
  assert abs(same) < 0.2 * brute
