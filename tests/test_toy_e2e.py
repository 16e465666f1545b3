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
  curves = _logged_steps(tmp_path / "metrics.jsonl")
  assert curves == _expected_curves(config), curves  # every run's full curve, none erased
  # Re-running restores every finished run instead of retraining: same numbers and curves.
  again = toy.run(config, str(tmp_path))
  assert again["ring8"] == ring
  assert _logged_steps(tmp_path / "metrics.jsonl") == curves


def _logged_steps(path):
  """{run: [steps it logged a loss at]} from a metrics.jsonl."""
  curves = {}
  for line in open(path):
    row = json.loads(line)
    for key in row:
      if key.endswith("/loss"):
        curves.setdefault(key[:-len("/loss")], []).append(row["step"])
  return curves


def _expected_curves(config):
  """The runs of the toy experiment and the steps each logs (every ``log_every``)."""
  every = lambda n, cfg: list(range(cfg.log_every, n + 1, cfg.log_every))
  runs = {"teacher": every(config.teacher.steps, config.teacher)}
  for method in config.sweep.methods:
    for s in config.sweep.student_steps:
      runs[toy.student_run_name(method, s)] = every(config.student.steps, config.student)
  runs[toy.FIG1_RUNS + "teacher"] = every(config.fig1.teacher_steps, config.teacher)
  for s in config.fig1.student_steps:
    runs[toy.FIG1_RUNS + toy.student_run_name("cd_addim", s)] = every(
        config.fig1.student_train_steps, config.student)
  return runs


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


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_a_segment_aware_student_starts_as_its_teacher_and_resolves_the_boundary():
  """model.segment_input: the student's extra embedding starts at zero (the student is the
  teacher at step 0); once trained it can jump at a segment boundary, where t alone cannot."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mcm_jax import objectives  # pylint: disable=g-import-not-at-top
  config = toy_config.get_config("tiny")
  config.model.segment_input = True
  model, _, teacher = objectives.toy_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])
  student_params = toy.student_init(config, params, 2)
  _, _, student = objectives.toy_model(config, 2)
  z = jax.random.normal(jax.random.PRNGKey(2), (64, 2))
  t = jnp.linspace(0.01, 1.0, 64)
  np.testing.assert_array_equal(student(student_params, z, t), teacher(params, z, t))
  kernel = student_params["params"]["segment_embed"]["kernel"]
  student_params["params"]["segment_embed"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(3), kernel.shape)
  change = lambda t0: float(jnp.abs(student(student_params, z, jnp.full((64,), t0))
                                    - student(student_params, z, jnp.full((64,), t0 + 1.5e-4))).max())
  assert change(0.5) > 10 * max(change(0.25), change(0.75))  # across vs within a segment
