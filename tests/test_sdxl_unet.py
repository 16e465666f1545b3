"""The scanned SDXL UNet (mcm_jax.models.sdxl_unet) == diffusers' Flax UNet with PyTorch's exact
GELU, values and gradients, for every remat policy and attention; its transformer blocks are
traced once per stack; LoRA applied unmerged. (Equality with diffusers' PyTorch UNet:
tests/test_sdxl.py, through ``sdxl.load_unet``.)"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from mcm_jax.flops import jaxpr_flops
from mcm_jax.errors import UserError
from mcm_jax.models import sdxl, sdxl_unet

warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")


@pytest.fixture(autouse=True)
def _exact_gelu(monkeypatch):
  """diffusers' Flax GEGLU with PyTorch's exact GELU (its own uses the tanh approximation, which
  ``test_diffusers_flax_geglu_is_the_tanh_approximation`` shows)."""
  from diffusers.models import attention_flax  # pylint: disable=g-import-not-at-top

  def call(self, hidden_states, deterministic=True):
    lin, gate = jnp.split(self.proj(hidden_states), 2, axis=2)
    return self.dropout_layer(lin * jax.nn.gelu(gate, approximate=False),
                              deterministic=deterministic)

  monkeypatch.setattr(attention_flax.FlaxGEGLU, "__call__", call)


def diffusers_unet(config):
  """diffusers' own FlaxUNet2DConditionModel: the independent reference."""
  return sdxl._from_config(sdxl._diffusers_flax_class("FlaxUNet2DConditionModel"), config,  # pylint: disable=protected-access
                           jnp.float32)


def scanned(model, params):
  """diffusers-layout ``params`` -> ``model``'s scanned layout."""
  del model
  return sdxl_unet.stack_blocks(params)


def inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  width, pooled = config["cross_attention_dim"], 32
  return (jnp.asarray(rng.normal(size=(batch, 4, 16, 16)), jnp.float32),
          jnp.array([999., 421., 3., 500.][:batch]),
          rng.normal(size=(batch, 7, width)).astype(np.float32),
          {"text_embeds": rng.normal(size=(batch, pooled)).astype(np.float32),
           "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))})


def random_params(model, seed=1):
  """Random parameters of ``model``'s shapes, drawn with numpy (no initialiser runs: diffusers'
  Flax UNet initialises op by op, ~40 s here): kernels and embeddings ``N(0, 1 / fan_in)``,
  biases ``N(0, 0.05^2)``, norm scales ``1 + N(0, 0.05^2)``, so no part is trivial."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    x = rng.standard_normal(shape).astype(np.float32)
    if name == "scale":
      return jnp.asarray(1.0 + 0.05 * x)
    if name == "bias":
      return jnp.asarray(0.05 * x)
    return jnp.asarray(x / np.sqrt(max(np.prod(shape[:-1]), 1)))

  shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def loss_and_grad(apply, params, args):
  f = lambda p: jnp.mean(apply(p, *args) ** 2)
  return jax.jit(jax.value_and_grad(f))(params)


def _models(remat="none", attention="xla", linear=True):
  config = dict(sdxl.TINY_UNET_CONFIG, transformer_layers_per_block=(1, 3),
                use_linear_projection=linear)
  return config, diffusers_unet(config), sdxl.unet_from_config(config, remat=remat,
                                                               attention=attention)


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
@pytest.mark.parametrize("remat,attention,linear", [
    ("none", "xla", True), ("full", "chunked", True), ("dots", "xla", False),
    ("dots,full", "xla", True)])
def test_scanned_unet_equals_diffusers_flax_unet(remat, attention, linear):
  config, ref, ours = _models(remat, attention, linear)
  shapes = lambda m: jax.eval_shape(m.init_weights, jax.random.PRNGKey(0))
  ours_in_diffusers_layout = {k: (shape,) for k, (_, _, shape) in
                              sdxl_unet.layout(shapes(ours)).items()}
  assert ours_in_diffusers_layout == {k: (v.shape,) for k, v in flatten_dict(shapes(ref)).items()}
  params, args = random_params(ref), inputs(config)
  want = ref.apply({"params": params}, *args[:3], added_cond_kwargs=args[3]).sample
  got = ours.apply({"params": scanned(ours, params)}, *args).sample
  assert float(jnp.abs(want).mean()) > 0.1
  np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.slow  # two UNet gradients compiled, ~1 min
def test_scanned_rematerialised_unet_gradients_equal_diffusers():
  config, ref, ours = _models("dots")
  params, args = random_params(ref), inputs(config)
  loss_ref, g_ref = loss_and_grad(
      lambda p, *a: ref.apply({"params": p}, *a[:3], added_cond_kwargs=a[3]).sample, params, args)
  loss, g = loss_and_grad(lambda p, *a: ours.apply({"params": sdxl_unet.stack_blocks(p)},
                                                  *a).sample, params, args)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  overall = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_ref))
  for key, want_g in flatten_dict(g_ref).items():  # (biases before a norm get ~0 gradients)
    scale = 1e-3 * float(jnp.abs(want_g).max()) + 1e-6 * overall
    np.testing.assert_allclose(flatten_dict(g)[key], want_g, atol=scale, rtol=0,
                               err_msg="/".join(key))


def _program(model, depth):
  """(jaxpr, its flops.jaxpr_flops) of one forward of ``model(config)`` at stack depth ``depth``."""
  config = dict(sdxl.TINY_UNET_CONFIG, transformer_layers_per_block=(1, depth))
  m = model(config)
  params = jax.eval_shape(m.init_weights, jax.random.PRNGKey(0))
  apply = (lambda p, *a: m.apply({"params": p}, *a[:3], added_cond_kwargs=a[3]).sample) if (
      model is diffusers_unet) else (lambda p, *a: m.apply({"params": p}, *a).sample)
  jaxpr = jax.make_jaxpr(apply)(params, *inputs(config))
  return str(jaxpr), jaxpr_flops(jaxpr)


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_transformer_blocks_are_traced_once_per_stack():
  """The program does not grow with the depth of a transformer stack (SDXL: 10), while
  diffusers' unrolled one does; both ask for the same FLOPs (the scan body counted per step)."""
  ours = _program(sdxl.unet_from_config, 2), _program(sdxl.unet_from_config, 6)
  theirs = _program(diffusers_unet, 2), _program(diffusers_unet, 6)
  dots = lambda program: program[0].count("dot_general")
  assert dots(ours[0]) == dots(ours[1])
  assert dots(theirs[1]) > dots(theirs[0]) + 40  # 3 attentions x 4 blocks x (8 dense + 2 attn)
  assert ours[1][1] == theirs[1][1] > ours[0][1] == theirs[0][1]


def test_stack_blocks_round_trip_and_order():
  params = {"a": {"transformer_blocks_1": {"w": jnp.ones(2)}, "transformer_blocks_0":
                  {"w": jnp.zeros(2)}, "norm": {"scale": jnp.ones(3)}}}
  stacked = sdxl_unet.stack_blocks(params)
  np.testing.assert_array_equal(stacked["a"]["transformer_blocks"]["w"], [[0, 0], [1, 1]])
  back = sdxl_unet.unstack_blocks(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  np.testing.assert_array_equal(back["a"]["transformer_blocks_1"]["w"], [1, 1])
  assert sdxl_unet.layout(stacked)[("a", "transformer_blocks_1", "w")] == (
      ("a", "transformer_blocks", "w"), 1, (2,))
  assert sdxl_unet.scanned_key(("a", "transformer_blocks_1", "w")) == (
      ("a", "transformer_blocks", "w"), 1)


def test_diffusers_flax_geglu_is_the_tanh_approximation(monkeypatch):
  """Why the UNet has its own transformer block: diffusers' Flax GEGLU is not PyTorch's exact
  GELU, x Phi(x) (here in float64; PyTorch's float32 1 + erf loses ~2e-6 to cancellation)."""
  from scipy.special import ndtr  # pylint: disable=g-import-not-at-top
  from diffusers.models import attention_flax  # pylint: disable=g-import-not-at-top
  monkeypatch.undo()
  x = np.linspace(-4, 4, 101, dtype=np.float32)
  ones = lambda n: {"proj": {"kernel": jnp.ones((1, n)), "bias": jnp.zeros(n)}}  # u = g = x
  flax_geglu = attention_flax.FlaxGEGLU(1)  # inner width 4 x dim
  got = np.asarray(flax_geglu.apply({"params": ones(8)}, jnp.asarray(x)[None, :, None]))[0, :, 0]
  want = x * (x * ndtr(x.astype(np.float64)))
  ours = sdxl_unet.GEGLU(1, jnp.float32).apply({"params": ones(2)}, jnp.asarray(x)[:, None])[:, 0]
  np.testing.assert_allclose(ours, want, atol=1e-6, rtol=0)
  assert np.abs(got - want).max() > 1e-4


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_lora_applied_unmerged_equals_the_merged_kernel_in_float32():
  """``lora.attach``: ``x W + s (x a) b`` == the UNet with ``W + s a b`` (float32), for a stack's
  blocks (zeros for the blocks the LoRA skips, ranks padded) and an unscanned convolution."""
  from mcm_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  config = dict(sdxl.TINY_UNET_CONFIG, transformer_layers_per_block=(1, 3))
  model = sdxl.unet_from_config(config)
  params = model.init_weights(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  shapes = sdxl_unet.kernel_shapes(params)
  chosen = {"down_blocks_1/attentions_0/transformer_blocks_2/attn1/to_q": 2,
            "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k": 3,
            "down_blocks_1/attentions_0/transformer_blocks_1/attn2/to_k": 1,
            "mid_block/attentions_0/proj_in": 2, "conv_in": 2}
  lora = {p: {"a": rng.normal(size=shapes[p][:-1] + (r,)).astype(np.float32) * 0.3,
              "b": rng.normal(size=(r, shapes[p][-1])).astype(np.float32) * 0.3}
          for p, r in chosen.items()}
  merged = sdxl_unet.unstack_blocks(params)
  flat = flatten_dict(merged)
  for p, ab in lora.items():
    key = tuple(p.split("/")) + ("kernel",)
    flat[key] = flat[key] + 0.5 * (ab["a"].reshape(-1, ab["a"].shape[-1]) @ ab["b"]).reshape(
        flat[key].shape)
  from flax.traverse_util import unflatten_dict  # pylint: disable=g-import-not-at-top
  merged = sdxl_unet.stack_blocks(unflatten_dict(flat))
  eps = jax.jit(sdxl.make_eps_fn(model))
  args = inputs(config)
  z, t, cond = jnp.transpose(args[0], (0, 2, 3, 1)), args[1], {
      "context": args[2], **args[3]}
  want, base = eps(merged, z, t, cond), eps(params, z, t, cond)
  got = eps(lora_lib.attach(params, lora, 0.5), z, t, cond)
  assert float(jnp.abs(want - base).max()) > 1e-2
  np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_remat_policies_keep_fewer_activations():
  """Compiled gradient's temporaries: full < dots < none (the policies are applied); a policy
  per level recomputes in between (gradient FLOPs: each level's blocks get their own policy)."""
  config = dict(sdxl.TINY_UNET_CONFIG, transformer_layers_per_block=(1, 3),  # attention at both
                down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2)
  args = inputs(config, batch=4)
  temp, flops = {}, {}
  for remat in ("none", "dots", "full", "full,dots", "dots,full"):
    model = sdxl.unet_from_config(config, remat=remat)
    params = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    grad = jax.grad(lambda p, m=model: jnp.mean(m.apply({"params": p}, *args).sample ** 2))
    flops[remat] = jaxpr_flops(jax.make_jaxpr(grad)(params))
    if "," not in remat:
      temp[remat] = jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots"] < temp["none"], temp
  assert flops["full"] > flops["full,dots"] > flops["dots"] > flops["none"], flops
  assert flops["full"] > flops["dots,full"] > flops["dots"], flops
  # the finer level has 1-block stacks of 32 channels, the coarser 3-block stacks of 64
  assert flops["dots,full"] - flops["dots"] > flops["full,dots"] - flops["dots"], flops
  with pytest.raises(UserError, match=r"remat='full,dots,none' names 3 policies; allowed: one, "
                     r"or one per level \(2\)"):
    sdxl.unet_from_config(config, remat="full,dots,none")


@pytest.mark.parametrize("field,value,match", [
    ("addition_embed_type", None, "addition_embed_type=None"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type"),
    ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D"), "up_block_types"),
    ("norm_num_groups", 16, "norm_num_groups=16"),
])
def test_unsupported_configs_are_named(field, value, match):
  with pytest.raises(UserError, match=match):
    sdxl.unet_from_config(dict(sdxl.TINY_UNET_CONFIG, **{field: value}))


def test_bad_remat_and_attention_are_named():
  with pytest.raises(UserError,
                     match=r"remat='some'.*allowed: \['dots', 'dots_convs', 'full', 'none'\]"):
    sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG, remat="some")
  with pytest.raises(UserError, match=r"attention='flash'.*allowed"):
    sdxl.unet_from_config(sdxl.TINY_UNET_CONFIG, attention="flash")


def test_the_tests_memoized_param_check_still_names_a_wrong_shape():
  """The suite's memoized Flax shape check (tests/memoized_param_check.py): a second apply reads
  its shapes from the memo, and a parameter of the wrong shape, inside the scanned stack or at the
  top, is still Flax's ScopeParamShapeError."""
  import memoized_param_check  # pylint: disable=g-import-not-at-top
  from flax import errors  # pylint: disable=g-import-not-at-top
  config = dict(sdxl.TINY_UNET_CONFIG, transformer_layers_per_block=(1, 3))
  model = sdxl.unet_from_config(config)
  params = model.init_weights(jax.random.PRNGKey(0))
  args = inputs(config, batch=1)
  apply = lambda p: jax.eval_shape(lambda: model.apply({"params": p}, *args).sample)
  assert apply(params).shape == args[0].shape
  hits = memoized_param_check.init_shapes.cache_info().hits
  apply(params)
  assert memoized_param_check.init_shapes.cache_info().hits > hits
  flat = flatten_dict(params)
  for path in (next(p for p in flat if "transformer_blocks" in "/".join(p) and p[-1] == "kernel"),
               ("conv_in", "kernel")):
    wrong = {**flat, path: jnp.zeros(flat[path].shape[:-1] + (flat[path].shape[-1] + 1,))}
    with pytest.raises(errors.ScopeParamShapeError, match=path[-2]):
      apply(unflatten_dict(wrong))
