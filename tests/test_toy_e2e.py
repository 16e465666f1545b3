"""The embedded default, end to end with tiny step counts."""
import json
import os

import pytest

from configs import toy as toy_config
from mcm_jax.experiments import toy


@pytest.mark.slow  # the whole tiny toy experiment, twice
def test_toy_run_end_to_end_and_resume(tmp_path):
  config = toy_config.get_config("tiny")
  results = toy.run(config, str(tmp_path))
  ring = results["ring8"]
  for key in ("teacher_addim_16", "teacher_ddim_16", "ct_1", "ct_2", "cd_addim_1",
              "cd_addim_2", "teacher_ddim_1", "data_vs_fresh_data"):
    assert key in ring and ring[key] == ring[key]  # present and not NaN
  assert abs(ring["data_vs_fresh_data"]) < ring["teacher_ddim_1"]
  assert set(results["mixture1d"]) == {"cd_addim_1", "cd_addim_2", "cd_addim_4",
                                       "teacher_ddim_128"}
  for name in ("samples.png", "fig1_trajectories.png", "results.json", "results.md"):
    assert os.path.getsize(tmp_path / name) > 1000 or name.endswith(("json", "md"))
  assert json.load(open(tmp_path / "results.json"))["ring8"] == ring
  # Re-running restores every finished run instead of retraining: same numbers.
  again = toy.run(config, str(tmp_path))
  assert again["ring8"] == ring


@pytest.mark.slow  # a tiny toy experiment end to end
def test_toy_run_accepts_a_python_data_source(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = toy_config.get_config("tiny")
  config.fig1.enabled = False
  config.sweep.methods = ("cd_ddim",)
  config.sweep.student_steps = (1,)
  data = np.random.RandomState(0).randn(3000, 3).astype(np.float32) * 0.5 + 1.0
  results = toy.run(config, str(tmp_path), data_source=data)
  assert set(results["custom"]) >= {"cd_ddim_1", "teacher_ddim_1", "teacher_addim_16"}
  assert os.path.exists(tmp_path / "samples.png")
  assert "Energy distance to custom data" in open(tmp_path / "results.md").read()
