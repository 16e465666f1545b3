import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax.models.uvit import UViT, uvit_config


def _count(res, size):
  model = UViT(**uvit_config(res, size))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), jnp.zeros((1,)),
      jnp.zeros((1,), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("res,size,reported", [(64, "small", 394e6), (64, "large", 1.23e9),
                                               (128, "small", 397e6), (128, "large", 1.25e9)])
def test_parameter_counts_match_the_paper(res, size, reported):
  assert abs(_count(res, size) / reported - 1) < 0.03


def _tiny(res=16, **kw):
  model = UViT(**{**uvit_config(64, "tiny"), **kw})
  z = jax.random.normal(jax.random.PRNGKey(0), (2, res, res, 3))
  logsnr, label = jnp.array([-3.0, 4.0]), jnp.array([1, 7])
  params = jax.jit(model.init)(jax.random.PRNGKey(1), z, logsnr, label)
  # The output convolution starts at zero; perturb all params so the test sees a real function.
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  return model, params, z, logsnr, label


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_tiny_forward_shapes_conditioning_and_dropout():
  model, params, z, logsnr, label = _tiny()
  apply = jax.jit(model.apply)
  out = apply(params, z, logsnr, label)
  assert out.shape == z.shape and out.dtype == jnp.float32 and np.all(np.isfinite(out))
  # label and logsnr both change the output; label=None is the null class.
  assert not np.allclose(out, apply(params, z, logsnr, label[::-1]))
  assert not np.allclose(out, apply(params, z, logsnr[::-1], label))
  np.testing.assert_allclose(apply(params, z, logsnr, None),
                             apply(params, z, logsnr, jnp.array([10, 10])), rtol=1e-6)
  # deterministic at eval; dropout active in training.
  dmodel = UViT(**{**uvit_config(64, "tiny"), "mid_dropout": 0.5})
  train = jax.jit(lambda p, rng: dmodel.apply(p, z, logsnr, label, train=True,
                                              rngs={"dropout": rng}))
  assert not np.allclose(train(params, jax.random.PRNGKey(3)), train(params, jax.random.PRNGKey(4)))


@pytest.mark.slow  # two gradients of the tiny UViT compiled (seconds)
def test_remat_and_bf16():
  model, params, z, logsnr, label = _tiny()
  loss = lambda m: lambda p: jnp.mean(m.apply(p, z, logsnr, label) ** 2)
  remat = UViT(**{**uvit_config(64, "tiny"), "remat": "full"})
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(remat)))(params)
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  bf16 = UViT(**{**uvit_config(64, "tiny"), "dtype": jnp.bfloat16})
  out = jax.jit(bf16.apply)(params, z, logsnr, label)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jax.jit(model.apply)(params, z, logsnr, label), atol=0.1)


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_remat_policies_save_what_they_name():
  """The backward pass recomputes matmuls and convolutions under 'full', convolutions and
  attention scores under 'dots', only attention scores (batched matmuls) under 'dots_convs';
  the gradients are the same."""
  from mcm_jax.flops import jaxpr_flops  # pylint: disable=g-import-not-at-top
  _, params, z, logsnr, label = _tiny()
  flops, grads = {}, {}
  for name in ("none", "dots_convs", "dots", "full"):
    model = UViT(**{**uvit_config(64, "tiny"), "remat": name})
    grad = jax.grad(lambda p, m=model: jnp.mean(m.apply(p, z, logsnr, label) ** 2))
    flops[name] = jaxpr_flops(jax.make_jaxpr(grad)(params))
    grads[name] = jax.jit(grad)(params)
  assert flops["none"] < flops["dots_convs"] < flops["dots"] < flops["full"], flops
  # what 'dots_convs' recomputes is small: the attention scores of the tiny model's one block
  assert flops["dots_convs"] - flops["none"] < 0.2 * (flops["dots"] - flops["none"]), flops
  for x, y in zip(jax.tree_util.tree_leaves(grads["none"]),
                  jax.tree_util.tree_leaves(grads["dots_convs"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_bad_size_names_the_value():
  with pytest.raises(ValueError, match="size='huge'"):
    uvit_config(64, "huge")
