"""patch_conv: a convolution as one matrix product of its patches, chosen on CPU only."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcm_jax.models import patch_conv
from mcm_jax.models import sdxl
from mcm_jax.models import sdxl_unet

NHWC = ("NHWC", "HWIO", "NHWC")


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), ((1, 1), (1, 1))),  # SDXL's resnets and up-samplers
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # its down-samplers
    ((1, 1), (1, 1), ((0, 0), (0, 0))),  # its 1x1 shortcuts
    ((3, 2), (2, 1), ((2, 0), (1, 1))),  # uneven, to catch a mixed-up axis
])
def test_patches_dot_is_xla_convolution(kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)
  k = rng.standard_normal((*kernel, 5, 12)).astype(np.float32)
  want = jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC,
                                      precision="highest")
  got = patch_conv.patches_dot(x, k, strides, padding, precision="highest")
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-6


def _lowered(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_conv_is_a_product_on_cpu_only_and_where_the_kernel_outweighs_the_patches():
  conv = lambda x, k: patch_conv.conv(x, k, (1, 1), ((1, 1), (1, 1)))
  few = jnp.zeros((2, 4, 4, 8)), jnp.zeros((3, 3, 8, 32))  # 32 output pixels, 32 channels
  many = jnp.zeros((2, 4, 4, 8)), jnp.zeros((3, 3, 8, 31))  # 32 pixels, 31 channels
  assert "convolution" not in _lowered(conv, *few, platform="cpu")
  assert "dot_general" in _lowered(conv, *few, platform="cpu")
  assert "convolution" in _lowered(conv, *many, platform="cpu")
  for platform in ("tpu", "cuda"):
    text = _lowered(conv, *few, platform=platform)
    assert "convolution" in text and "dot_general" not in text
  rng = np.random.default_rng(1)
  x, k = (rng.standard_normal(a.shape).astype(np.float32) for a in few)
  want = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                      precision="highest")
  assert _rel(jax.jit(conv)(x, k), want) < 1e-5
  # its gradients are the convolution's
  g = rng.standard_normal(want.shape).astype(np.float32)
  loss = lambda f: lambda x, k: jnp.vdot(f(x, k), g)
  xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=NHWC)
  for got, ref in zip(jax.grad(loss(conv), (0, 1))(x, k), jax.grad(loss(xla), (0, 1))(x, k)):
    assert _rel(got, ref) < 1e-5


class _Convs(nn.Module):
  """Flax convolutions the interceptor computes (explicit and 'VALID' padding, strides, no
  bias, a bfloat16 dtype over float32 parameters) and one it leaves to Flax ('SAME')."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(48, (3, 3), padding=((1, 1), (1, 1)), name="explicit")(x)
    x = nn.Conv(64, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                name="strided")(x)
    x = nn.Conv(64, (1, 1), padding="VALID", dtype=jnp.bfloat16, name="low_precision")(x)
    return nn.Conv(64, (3, 3), padding="SAME", name="same")(x)


def test_on_cpu_computes_flax_convolutions_as_flax_does():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 8, 16)), jnp.float32)
  model = _Convs()
  params = model.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # nonzero biases
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv):
      layout = patch_conv._supported(context.module, args[0])  # pylint: disable=protected-access
      seen.append((context.module.name, layout))
    return next_fun(*args, **kwargs)

  def apply(p, x):
    with nn.intercept_methods(spy), nn.intercept_methods(patch_conv.on_cpu):
      return model.apply(p, x)

  want = model.apply(params, x)
  got = jax.jit(apply)(params, x)
  assert got.dtype == want.dtype
  assert _rel(got, want) < 1e-2  # the bfloat16 layer's rounding; float32 layers agree to 1e-6
  assert [name for name, layout in seen if layout is not None] == [
      "explicit", "strided", "low_precision"]
  assert "convolution" in jax.jit(apply).lower(params, x).as_text()  # 'same' left to Flax
  explicit = dict(params["params"]["explicit"], kernel=jnp.zeros((3, 3, 16, 47)))
  wrong = {"params": dict(params["params"], explicit=explicit)}
  with pytest.raises(flax.errors.ScopeParamShapeError, match="explicit"):
    apply(wrong, x)  # Flax's shape check is kept


@pytest.mark.slow
def test_the_sdxl_unet_computes_its_few_pixel_convolutions_as_products_on_cpu():
  """The production path: ``SDXLUNet.apply`` on CPU has fewer convolutions than on TPU, and
  computes the same function as the UNet without the interceptor."""
  model = sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG)  # 32 / 64 channels: 8 x 8 and 4 x 4 px
  params = model.init_weights(jax.random.PRNGKey(0))
  _, _, context, added, _ = sdxl_unet.smallest_inputs(model.config)
  rng = np.random.default_rng(3)
  sample = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
  args = (sample, jnp.full((1,), 500.0), jnp.asarray(rng.standard_normal(context.shape)), added)
  run = lambda p, *a: model.apply({"params": p}, *a).sample
  cpu, tpu = (_lowered(run, params, *args, platform=p).count("stablehlo.convolution")
              for p in ("cpu", "tpu"))
  assert 0 < cpu < tpu
  plain = lambda p, *a: model.module.apply({"params": p}, *a)  # no interceptor: XLA's everywhere
  assert _rel(jax.jit(run)(params, *args), jax.jit(plain)(params, *args)) < 1e-5
