import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import toy as toy_config
from mcm_jax.config_validation import ConfigError, validate_toy
from mcm_jax.data import toy as toy_data
from mcm_jax.evaluation import energy_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_and_tiny_configs_are_valid():
  validate_toy(toy_config.get_config())
  validate_toy(toy_config.get_config("tiny"))
  with pytest.raises(ValueError, match="'huge'.*allowed"):
    toy_config.get_config("huge")


@pytest.mark.parametrize("field,value,message", [
    ("consistency.student_steps", (0, 2), r"consistency.student_steps=\(0, 2\).*integers >= 1"),
    ("consistency.teacher_steps_start", 8, r"teacher_steps_start=8.*largest student step"),
    ("consistency.xvar_frac", -0.5, r"xvar_frac=-0.5.*>= 0"),
    ("consistency.methods", ("ct", "pd"), r"methods=\('ct', 'pd'\)"),
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
    validate_toy(config)


def test_main_rejects_a_bad_config_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mcm_jax.main", "--config=configs/toy.py:tiny",
       "--config.consistency.student_steps=(0,)", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.consistency.student_steps=(0,)" in proc.stderr
  assert not os.path.exists(tmp_path / "teacher")


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
