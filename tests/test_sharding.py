"""Sharded training == single-device training on 8 fake CPU devices; restore onto another mesh."""
import functools

import jax
import numpy as np
import pytest

from helpers import LOGSNR, mlp_denoiser, train_config
from mcm_jax import consistency, sharding, train
from mcm_jax.data import toy as toy_data

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _cfg(steps):
  return train_config(steps, log_every=5, checkpoint_every=5, learning_rate=1e-3,
                      warmup_steps=2)


def _cd_problem():
  """A CD student/teacher pair large enough that fsdp really shards (128 x 128 kernels)."""
  denoise, params = mlp_denoiser(hidden=128, depth=2, dim=2)  # 2-D data: ring8
  teacher = jax.tree_util.tree_map(lambda x: x + 0.01, params)
  loss = functools.partial(consistency.consistency_loss, denoise_fn=denoise, logsnr_fn=LOGSNR,
                           student_steps=2, teacher_fn=denoise)
  return loss, params, teacher


def _close(a, b, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_param_rules():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  assert sharding.param_spec((128, 256), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.param_spec((128,), 4) == jax.sharding.PartitionSpec()  # too small
  assert sharding.param_spec((129, 257), 4) == jax.sharding.PartitionSpec()  # not divisible
  assert sharding.param_spec((3, 3, 640, 640), 8) == jax.sharding.PartitionSpec()  # convolution
  assert sharding.param_spec((1, 1, 640, 1280), 8) == jax.sharding.PartitionSpec()
  assert sharding.param_spec((512, 3, 8, 64), 8) == jax.sharding.PartitionSpec(  # DenseGeneral
      "fsdp", None, None, None)
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  with pytest.raises(ValueError, match="data=3 x fsdp=2 does not cover the 8 devices"):
    sharding.make_mesh(data=3, fsdp=2)
  assert sharding.make_mesh(data=-1, fsdp=4).shape == {"data": 2, "fsdp": 4}


def test_lora_factors_are_replicated_and_frozen_kernels_split():
  """sharding.LOW_RANK_FACTORS: a LoRA tree, its Adam moments and EMA stay replicated; the
  kernels it adapts are split over fsdp."""
  from mcm_jax import lora  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=1, fsdp=8)
  kernel = {"down": {"attn1": {"to_q": {"kernel": np.zeros((640, 640), np.float32)}}}}
  factors = lora.init_lora(kernel, 64, jax.random.PRNGKey(0), ("to_q",))
  state = train.init_state(factors, train.make_optimizer(_cfg(1).optim), 0)
  specs = jax.tree_util.tree_leaves(sharding.tree_shardings(state, mesh))
  factor_copies = [x for x in jax.tree_util.tree_leaves(state) if np.size(x) >= 640 * 64]
  assert len(factor_copies) == 4 * 2  # a and b: parameters, EMA, Adam's two moments
  assert all(s.spec == jax.sharding.PartitionSpec() for s in specs)
  (spec,) = jax.tree_util.tree_leaves(sharding.tree_shardings(kernel, mesh))
  assert spec.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_noise_made_inside_a_sharded_step_is_split_by_batch():
  """sharding.constrain_batch under train.make_multi_step's mesh: noise drawn in the loss has
  the batch's sharding (GSPMD would otherwise be free to replicate it); outside a step it is a
  no-op."""
  mesh = sharding.make_mesh(data=2, fsdp=4)

  def loss(params, batch, rng, step, frozen):
    del step, frozen
    noise = sharding.constrain_batch(jax.random.normal(rng, batch["x"].shape))
    return jax.numpy.mean((noise - params["w"]) ** 2), {}

  tx = train.make_optimizer(_cfg(1).optim)
  state = jax.device_put(train.init_state({"w": np.zeros((), np.float32)}, tx, 0),
                         sharding.replicated(mesh))
  batches = sharding.shard_batch({"x": np.zeros((1, 16, 3), np.float32)}, mesh, stacked=True)
  step = train.jit_step(loss, tx, _cfg(1), state, None, mesh)
  per_chip = step.lower(state, None, batches).compile().as_text()  # after SPMD partitioning
  assert "f32[2,3]" in per_chip and "f32[16,3]" not in per_chip  # unconstrained: f32[16,3]
  x = np.ones((16, 3), np.float32)
  assert sharding.constrain_batch(x) is x


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_cd_training_equals_single_device(tmp_path, data, fsdp):
  loss, params, teacher = _cd_problem()
  batch_fn = lambda rng: {"x": toy_data.ring8(rng, 64)}
  single = train.train(loss, params, batch_fn, _cfg(10), str(tmp_path / "single"),
                       frozen=teacher)
  mesh = sharding.make_mesh(data=data, fsdp=fsdp)
  sharded = train.train(loss, params, batch_fn, _cfg(10), str(tmp_path / "sharded"),
                        frozen=teacher, mesh=mesh)
  kernel = sharded.params["params"]["Dense_2"]["kernel"]
  assert kernel.shape == (128, 128)
  assert len(kernel.sharding.device_set) == 8
  if fsdp > 1:  # really split, not replicated
    assert kernel.addressable_shards[0].data.shape[0] * kernel.addressable_shards[0].data.shape[
        1] == 128 * 128 // fsdp
  _close(single.params, sharded.params, atol=2e-5)
  _close(single.opt_state, sharded.opt_state, atol=2e-5)


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_host_batches_equal_device_batches_and_restore_onto_another_mesh(tmp_path):
  """Host data path == device data path; a checkpoint written on a 2x4 mesh resumes on 8x1 and
  ends where an uninterrupted 2x4 run does."""
  loss, params, teacher = _cd_problem()
  batch_fn = lambda rng: {"x": toy_data.ring8(rng, 64)}
  data_rng = jax.random.fold_in(jax.random.PRNGKey(0), 1)  # train()'s data stream, seed 0
  host_batch_fn = lambda step: jax.device_get(batch_fn(jax.random.fold_in(data_rng, step)))
  mesh_a, mesh_b = sharding.make_mesh(2, 4), sharding.make_mesh(8, 1)
  full = train.train(loss, params, batch_fn, _cfg(10), str(tmp_path / "full"), frozen=teacher,
                     mesh=mesh_a)
  train.train(loss, params, None, _cfg(5), str(tmp_path / "split"), frozen=teacher,
              mesh=mesh_a, host_batch_fn=host_batch_fn)
  resumed = train.train(loss, params, None, _cfg(10), str(tmp_path / "split"), frozen=teacher,
                        mesh=mesh_b, host_batch_fn=host_batch_fn)
  assert int(resumed.step) == 10
  assert resumed.params["params"]["Dense_2"]["kernel"].sharding.mesh.shape == {"data": 8,
                                                                               "fsdp": 1}
  _close(full.params, resumed.params, atol=2e-5)
  with pytest.raises(ValueError, match="exactly one of batch_fn"):
    train.train(loss, params, batch_fn, _cfg(10), str(tmp_path / "x"), host_batch_fn=host_batch_fn)
