"""SDXL's UNet with each transformer stack under ``nn.scan``, optionally rematerialised, and
LoRA applied unmerged.

diffusers' ``FlaxUNet2DConditionModel`` unrolls SDXL's 70 transformer blocks, so one UNet call
is 70 copies of the block in XLA's program and an MLCM step (guided teacher, image-free latents,
student target, student forward and backward) is five such UNets. Here the ``depth`` blocks of
each ``Transformer2D`` (1, 2 or 10 in SDXL) are one scanned block, rematerialised under a policy
(``mcm_jax.models.remat``).

The function is diffusers' PyTorch ``UNet2DConditionModel`` for the configurations SDXL uses
(text_time added conditioning, ``UNetMidBlock2DCrossAttn``, and LCM's ``time_cond_proj_dim``):
diffusers' Flax leaves (``FlaxResnetBlock2D``, ``FlaxDownsample2D``, ``FlaxUpsample2D``,
``FlaxTimesteps``), this module's ``TimestepEmbedding`` (PyTorch's, with its ``cond_proj``) and
transformer block, which is diffusers' ``FlaxBasicTransformerBlock`` with the exact GELU in its
GEGLU feed-forward (PyTorch's; diffusers' Flax block uses the tanh approximation).

Parameters are held in the scanned layout: every ``transformer_blocks_<i>`` of diffusers' layout
is ``transformer_blocks`` with the blocks' leaves stacked on a leading ``depth`` axis. Loaders
stack once (``layout`` maps each diffusers name to its place); nothing is stacked in the forward.

LoRA (``Adapted``): factors ``a [in, r]`` (a convolution's ``[kh, kw, in, r]``) and ``b [r, out]``
in a ``lora`` variable collection beside the module they adapt (stacked like the parameters in
a scanned stack); ``y = x W + (x a) b`` with the low-rank term in float32, added to the layer's
output, so a small update is not rounded away by low-precision weights.

Convolutions with few output pixels run on CPU as one matrix product (``patch_conv``).
"""
import contextlib
import dataclasses
import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from mcm_jax import sharding
from mcm_jax.errors import UserError
from mcm_jax.models import patch_conv
from mcm_jax.models import remat as remat_lib

ATTENTION = ("xla", "chunked")  # chunked: diffusers' memory-efficient (query/key chunked) kernel
LORA = "lora"  # the variable collection of unmerged LoRA factors
STACK = "transformer_blocks"  # a scanned stack's name in the scanned layout
_BLOCKS = re.compile(r"transformer_blocks_(\d+)$")


def _drop_flax_deprecation(record):
  return "Flax classes are deprecated" not in record.getMessage()


def diffusers():
  """The diffusers module with its Flax classes' "Flax classes are deprecated" notice (logged
  at every trace) filtered from its log handlers -- diffusers is pinned < 0.40 for that reason."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import diffusers as module  # pylint: disable=g-import-not-at-top
    from diffusers.utils import logging as dlogging  # pylint: disable=g-import-not-at-top
  for handler in dlogging._get_library_root_logger().handlers:  # pylint: disable=protected-access
    if _drop_flax_deprecation not in handler.filters:
      handler.addFilter(_drop_flax_deprecation)
  return module


def _leaves():
  """diffusers' Flax building blocks (their notice quieted)."""
  diffusers()
  from diffusers.models import embeddings_flax, resnet_flax  # pylint: disable=g-import-not-at-top
  return embeddings_flax, resnet_flax


class Attention(nn.Module):
  """diffusers' ``FlaxAttention``: ``to_out_0(softmax(q k^T / sqrt(d)) v)`` over ``heads`` heads,
  with q from ``hidden`` and k, v from ``context`` (``hidden`` itself for self-attention)."""
  dim: int
  heads: int
  chunked: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, hidden, context=None):
    context = hidden if context is None else context
    dense = lambda name, bias=False: nn.Dense(self.dim, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, -1)  # [B, L, heads, d]
    q, k, v = split(dense("to_q")(hidden)), split(dense("to_k")(context)), split(
        dense("to_v")(context))
    b, length, _, d = q.shape
    if self.chunked:  # diffusers' query / key chunked kernel and chunk sizes
      from diffusers.models.attention_flax import jax_memory_efficient_attention  # pylint: disable=g-import-not-at-top
      chunks = next((length // n for n in (64, 16, 4) if length % n == 0), length)
      out = jax_memory_efficient_attention(q, k, v, query_chunk_size=chunks,
                                           key_chunk_size=4096 * 4)
    else:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
      out = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(scores, axis=-1), v)
    return dense("to_out_0", bias=True)(out.reshape(b, length, self.dim))


class TransformerBlock(nn.Module):
  """diffusers' ``FlaxBasicTransformerBlock`` as a scan body, ``(h, context) -> (h', None)``:
  self-attention, cross-attention and a GEGLU feed-forward with the exact GELU, each after a
  LayerNorm and added to its input. In a sharded train step ``h`` is kept split by batch
  (``sharding.constrain_batch``): the scan's weight slices are split by feature, and left to
  itself GSPMD may split the carried activations the same way and gather their batch."""
  dim: int
  heads: int
  chunked: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, hidden, context):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attention = lambda name: Attention(self.dim, self.heads, self.chunked, self.dtype, name=name)
    split = sharding.constrain_batch  # in a sharded step, each chip its own examples
    feed_forward = GEGLUFeedForward(self.dim, self.dtype, name="ff")
    hidden = split(hidden)
    hidden = split(hidden + attention("attn1")(norm("norm1")(hidden)))
    hidden = split(hidden + attention("attn2")(norm("norm2")(hidden), context))
    hidden = split(hidden + feed_forward(norm("norm3")(hidden)))
    return hidden, None


class GEGLU(nn.Module):
  """diffusers' ``GEGLU``: ``u * gelu(g)`` with ``[u, g] = proj(x)`` and the exact GELU
  (``erf``, as PyTorch's ``F.gelu``)."""
  inner: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    u, g = jnp.split(nn.Dense(self.inner * 2, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return u * nn.gelu(g, approximate=False)


class GEGLUFeedForward(nn.Module):
  """diffusers' ``FeedForward`` (GEGLU, 4x width): ``net_2(net_0(x))``."""
  dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * 4, self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class _Stacks(nn.Module):
  """The transformer stacks' settings at one UNet level: heads, depth (0 at a level without
  attention) and the UNet's options."""
  heads: int
  depth: int
  linear_projection: bool
  remat: str
  chunked: bool
  dtype: jnp.dtype


class Transformer2D(_Stacks):
  """diffusers' ``FlaxTransformer2DModel`` (linear or 1x1-conv projections) with its ``depth``
  blocks scanned: ``h + proj_out(blocks(proj_in(norm(h))))``; the width is the input's."""

  @nn.compact
  def __call__(self, hidden, context):
    b, h, w, c = hidden.shape
    proj = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.linear_projection else (
        lambda name: nn.Conv(c, (1, 1), padding="VALID", dtype=self.dtype, name=name))
    x = nn.GroupNorm(num_groups=32, epsilon=1e-5, name="norm")(hidden)
    if self.linear_projection:
      x = proj("proj_in")(x.reshape(b, h * w, c))
    else:
      x = proj("proj_in")(x).reshape(b, h * w, c)
    body = remat_lib.wrap(TransformerBlock, self.remat, prevent_cse=False)  # not needed in scan
    blocks = nn.scan(body, variable_axes={"params": 0, LORA: 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=self.depth)
    x, _ = blocks(c, self.heads, self.chunked, self.dtype, name=STACK)(x, context)
    if self.linear_projection:
      x = proj("proj_out")(x).reshape(b, h, w, c)
    else:
      x = proj("proj_out")(x.reshape(b, h, w, c))
    return x + hidden


class _Level(_Stacks):
  """A block of one UNet level: resnets and, where ``depth`` > 0, transformer stacks."""

  def transformers(self, count):
    return [Transformer2D(self.heads, self.depth, self.linear_projection, self.remat,
                          self.chunked, self.dtype) for _ in range(count)]


class DownBlock(_Level):
  """diffusers' ``FlaxDownBlock2D`` (depth 0) / ``FlaxCrossAttnDownBlock2D``."""
  in_channels: int
  out_channels: int
  num_layers: int
  add_downsample: bool

  def setup(self):
    _, resnet_flax = _leaves()
    self.resnets = [resnet_flax.FlaxResnetBlock2D(
        in_channels=self.in_channels if i == 0 else self.out_channels,
        out_channels=self.out_channels, dtype=self.dtype) for i in range(self.num_layers)]
    if self.depth:
      self.attentions = self.transformers(self.num_layers)
    if self.add_downsample:
      self.downsamplers_0 = resnet_flax.FlaxDownsample2D(self.out_channels, dtype=self.dtype)

  def __call__(self, hidden, temb, context):
    outputs = ()
    for i, resnet in enumerate(self.resnets):
      hidden = resnet(hidden, temb)
      if self.depth:
        hidden = self.attentions[i](hidden, context)
      outputs += (hidden,)
    if self.add_downsample:
      hidden = self.downsamplers_0(hidden)
      outputs += (hidden,)
    return hidden, outputs


class UpBlock(_Level):
  """diffusers' ``FlaxUpBlock2D`` (depth 0) / ``FlaxCrossAttnUpBlock2D``."""
  in_channels: int
  out_channels: int
  prev_output_channel: int
  num_layers: int
  add_upsample: bool

  def setup(self):
    _, resnet_flax = _leaves()
    resnets = []
    for i in range(self.num_layers):
      skip = self.in_channels if i == self.num_layers - 1 else self.out_channels
      inputs = self.prev_output_channel if i == 0 else self.out_channels
      resnets.append(resnet_flax.FlaxResnetBlock2D(
          in_channels=inputs + skip, out_channels=self.out_channels, dtype=self.dtype))
    self.resnets = resnets
    if self.depth:
      self.attentions = self.transformers(self.num_layers)
    if self.add_upsample:
      self.upsamplers_0 = resnet_flax.FlaxUpsample2D(self.out_channels, dtype=self.dtype)

  def __call__(self, hidden, skips, temb, context):
    for i, resnet in enumerate(self.resnets):
      hidden = resnet(jnp.concatenate((hidden, skips[-1 - i]), axis=-1), temb)
      if self.depth:
        hidden = self.attentions[i](hidden, context)
    if self.add_upsample:
      hidden = self.upsamplers_0(hidden)
    return hidden


class MidBlock(_Level):
  """diffusers' ``FlaxUNetMidBlock2DCrossAttn`` (one attention): resnet, attention, resnet."""
  channels: int

  def setup(self):
    _, resnet_flax = _leaves()
    self.resnets = [resnet_flax.FlaxResnetBlock2D(in_channels=self.channels,
                                                  out_channels=self.channels, dtype=self.dtype)
                    for _ in range(2)]
    self.attentions = self.transformers(1)

  def __call__(self, hidden, temb, context):
    hidden = self.resnets[0](hidden, temb)
    return self.resnets[1](self.attentions[0](hidden, context), temb)


class TimestepEmbedding(nn.Module):
  """diffusers' ``TimestepEmbedding``: ``linear_2(silu(linear_1(x + cond_proj(cond))))``, the
  bias-free ``cond_proj`` only where a condition is given (LCM's guidance-scale embedding, a
  UNet with ``time_cond_proj_dim``)."""
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond=None):
    if cond is not None:
      x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(cond)
    x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The per-level settings of a diffusers UNet (or ControlNet) ``config.json``."""
  channels: tuple
  heads: tuple  # diffusers reads attention_head_dim as the number of heads
  depths: tuple  # transformer blocks per stack; 0 at a level without attention
  layers: int
  linear: bool
  flip: bool
  shift: int

  @classmethod
  def of(cls, cfg):
    channels = tuple(cfg["block_out_channels"])
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(channels)
    cross = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    depths = tuple(d if c else 0 for d, c in
                   zip(per_level(cfg.get("transformer_layers_per_block", 1)), cross))
    return cls(channels, per_level(cfg["attention_head_dim"]), depths, cfg["layers_per_block"],
               cfg.get("use_linear_projection", False), cfg.get("flip_sin_to_cos", True),
               cfg.get("freq_shift", 0))


def embed_conditions(cfg, arch, dtype, batch, timesteps, added_cond_kwargs, timestep_cond=None):
  """``temb`` [B, 4 C0]: the time embedding (with ``cond_proj(timestep_cond)`` where the config
  has ``time_cond_proj_dim``) plus SDXL's text_time embedding of ``text_embeds`` and the sinusoids
  of ``time_ids``; modules ``time_proj``, ``time_embedding``, ``add_time_proj``,
  ``add_embedding`` of the calling (compact) module."""
  embeddings_flax, _ = _leaves()
  width = arch.channels[0]
  timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
  temb = embeddings_flax.FlaxTimesteps(width, flip_sin_to_cos=arch.flip, freq_shift=arch.shift,
                                       name="time_proj")(timesteps)
  temb = TimestepEmbedding(width * 4, dtype=dtype, name="time_embedding")(
      temb, timestep_cond if cfg.get("time_cond_proj_dim") else None)
  text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
  time_embeds = embeddings_flax.FlaxTimesteps(cfg["addition_time_embed_dim"], arch.flip,
                                              arch.shift, name="add_time_proj")(jnp.ravel(time_ids))
  time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
  return temb + TimestepEmbedding(width * 4, dtype=dtype, name="add_embedding")(
      jnp.concatenate([text_embeds, time_embeds], axis=-1))


def conv3x3(features, dtype, name, strides=1):
  return nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)), dtype=dtype,
                 name=name)


def down_path(arch, remat, common, h, temb, context):
  """(h, skips) of the down blocks and the mid block on ``h`` (``conv_in``'s output, NHWC):
  ``skips`` are ``h`` and every down block's outputs (what the up path concatenates and a
  ControlNet's zero convolutions read); modules ``down_blocks_<i>`` and ``mid_block`` of the
  calling module."""
  levels = len(arch.channels)
  skips = (h,)
  for i in range(levels):
    h, outputs = DownBlock(
        heads=arch.heads[i], depth=arch.depths[i], in_channels=arch.channels[max(i - 1, 0)],
        out_channels=arch.channels[i], num_layers=arch.layers, add_downsample=i < levels - 1,
        remat=remat[i], name=f"down_blocks_{i}", **common)(h, temb, context)
    skips += outputs
  h = MidBlock(heads=arch.heads[-1], depth=arch.depths[-1], channels=arch.channels[-1],
               remat=remat[-1], name="mid_block", **common)(h, temb, context)
  return h, skips


def nhwc(x):
  return jnp.transpose(x, (0, 2, 3, 1))


def nchw(x):
  return jnp.transpose(x, (0, 3, 1, 2))


class Network(nn.Module):
  """What SDXL's UNet and ControlNet are built from: a diffusers ``config`` dict, the remat
  policy (``remat.per_level``), the attention kernel (``ATTENTION``) and the compute dtype."""
  config: dict
  remat: str = "none"
  attention: str = "xla"
  dtype: jnp.dtype = jnp.float32


class ScannedUNet(Network):
  """SDXL's UNet on the scanned parameter layout; ``__call__`` as diffusers' (NCHW in, NCHW out).
  ``config``: the fields of a diffusers UNet ``config.json`` that SDXL uses (and
  ``time_cond_proj_dim``: ``timestep_cond`` [B, dim] enters the time embedding, as LCM's
  guidance-conditioned students take it). ``down_block_additional_residuals`` (NCHW, one per
  skip) and ``mid_block_additional_residual``, a ControlNet's outputs, are added to the skips
  and to the mid block's output, as in diffusers."""

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs,
               timestep_cond=None, down_block_additional_residuals=None,
               mid_block_additional_residual=None):
    cfg, dtype, arch = self.config, self.dtype, Architecture.of(self.config)
    levels, layers = len(arch.channels), arch.layers
    temb = embed_conditions(cfg, arch, dtype, sample.shape[0], timesteps, added_cond_kwargs,
                            timestep_cond)
    remat = remat_lib.per_level(self.remat, levels, "UNet remat")
    common = dict(linear_projection=arch.linear, chunked=self.attention == "chunked",
                  dtype=dtype)
    h = conv3x3(arch.channels[0], dtype, "conv_in")(nhwc(sample))
    h, skips = down_path(arch, remat, common, h, temb, encoder_hidden_states)
    if down_block_additional_residuals is not None:
      skips = tuple(s + nhwc(r) for s, r in zip(skips, down_block_additional_residuals,
                                                strict=True))
    if mid_block_additional_residual is not None:
      h = h + nhwc(mid_block_additional_residual)
    up = arch.channels[::-1]
    for i in range(levels):
      level = levels - 1 - i
      skips, level_skips = skips[:-(layers + 1)], skips[-(layers + 1):]
      h = UpBlock(
          heads=arch.heads[level], depth=arch.depths[level],
          in_channels=up[min(i + 1, levels - 1)], out_channels=up[i],
          prev_output_channel=up[max(i - 1, 0)], num_layers=layers + 1,
          add_upsample=i < levels - 1, remat=remat[level], name=f"up_blocks_{i}", **common)(
              h, level_skips, temb, encoder_hidden_states)
    h = nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="conv_norm_out")(h))
    return nchw(conv3x3(cfg["out_channels"], dtype, "conv_out")(h))


def scanned_key(key):
  """(scanned-layout key, block index or None) of a diffusers-layout key tuple:
  ``(..., 'transformer_blocks_3', 'attn1', ...)`` -> ``((..., 'transformer_blocks', 'attn1',
  ...), 3)``."""
  for j, part in enumerate(key):
    m = _BLOCKS.match(part)
    if m:
      return key[:j] + (STACK,) + key[j + 1:], int(m.group(1))
  return tuple(key), None


def layout(params):
  """{diffusers-layout key tuple: (scanned key tuple, block index or None, diffusers shape)} of
  scanned-layout ``params`` (arrays or ShapeDtypeStructs; nothing is read or copied)."""
  out = {}
  for key, leaf in flatten_dict(params).items():
    shape = tuple(np.shape(leaf))
    if STACK not in key:
      out[key] = (key, None, shape)
      continue
    j = key.index(STACK)
    for i in range(shape[0]):
      out[key[:j] + (f"transformer_blocks_{i}",) + key[j + 1:]] = (key, i, shape[1:])
  return out


def kernel_shapes(params):
  """{'/'-joined diffusers module path: kernel shape} of every Dense ([in, out]) and
  convolution ([kh, kw, in, out]) kernel of scanned-layout ``params``: what LoRA adapts."""
  return {"/".join(k[:-1]): shape for k, (_, _, shape) in layout(params).items()
          if k[-1] == "kernel" and len(shape) in (2, 4)}


def unstack_blocks(params):
  """The scanned layout -> diffusers' (every stacked leaf split into ``transformer_blocks_<i>``);
  for writing diffusers-layout files."""
  flat = flatten_dict(params)
  return unflatten_dict({key: flat[skey] if i is None else flat[skey][i]
                         for key, (skey, i, _) in layout(params).items()})


def stack_blocks(params):
  """diffusers' layout -> the scanned one (inverse of ``unstack_blocks``)."""
  groups = {}
  for key, value in flatten_dict(params).items():
    skey, i = scanned_key(key)
    groups.setdefault(skey, {})[i] = value
  return unflatten_dict({k: v[None] if None in v else jnp.stack([v[i] for i in range(len(v))])
                         for k, v in groups.items()})


@struct.dataclass
class Adapted:
  """UNet parameters with LoRA factors to apply unmerged: ``params`` (scanned layout) and
  ``lora`` (the ``LORA`` collection: ``{module path...: {'a', 'b'}}``, stacked in scanned stacks,
  the scale folded into ``b``); made by ``mcm_jax.lora.attach``."""
  params: dict
  lora: dict


def variables(params):
  """The UNet's variables for ``apply``: plain parameters or ``Adapted`` ones."""
  if isinstance(params, Adapted):
    return {"params": params.params, LORA: params.lora}
  return {"params": params}


def _expand(low, b):
  """``low @ b`` as a dot with a batch axis of size 1, which the ``dots`` remat policies do not
  save: the backward pass keeps ``low`` ([..., r]) and recomputes this full-width product."""
  out = jax.lax.dot_general(low[None], b[None], (((low.ndim,), (1,)), ((0,), (0,))))
  return out[0]


def _low_rank(module, x, a, b):
  """``(x a) b`` in float32 for a Dense (``a [in, r]``) or convolution (``a [kh, kw, in, r]``,
  the module's strides and padding) ``module``."""
  x = x.astype(jnp.float32)
  if a.ndim == 2:
    return _expand(x @ a.astype(jnp.float32), b.astype(jnp.float32))
  rank = len(module.kernel_size)
  strides = module.strides or 1
  strides = (strides,) * rank if isinstance(strides, int) else tuple(strides)
  h = jax.lax.conv_general_dilated(
      x, a.astype(jnp.float32), strides, nn.linear.canonicalize_padding(module.padding, rank),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return _expand(h, b.astype(jnp.float32))


def _apply_lora(next_fun, args, kwargs, context):
  """A Flax method interceptor: a Dense / Conv with ``LORA`` factors returns ``y + (x a) b``."""
  module = context.module
  y = next_fun(*args, **kwargs)
  if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv))
      or not module.has_variable(LORA, "a")):
    return y
  delta = _low_rank(module, args[0], module.get_variable(LORA, "a"),
                    module.get_variable(LORA, "b"))
  return (y.astype(jnp.float32) + delta).astype(y.dtype)


@struct.dataclass
class UNetOutput:
  """What diffusers' UNet returns: ``.sample`` (a pytree, so jitted functions may return it)."""
  sample: jax.Array


@dataclasses.dataclass(frozen=True)
class SDXLUNet:
  """The scanned UNet behind diffusers' model interface: ``apply(variables, sample, timesteps,
  context, added_cond_kwargs).sample`` with ``variables = {'params': p}`` or ``{'params': p,
  'lora': l}`` (``variables``), ``init_weights(rng)`` (scanned layout), ``config`` (the diffusers
  config dict)."""
  module: ScannedUNet

  @property
  def config(self):
    return self.module.config

  @property
  def dtype(self):
    return self.module.dtype

  def apply(self, variables, sample, timesteps, encoder_hidden_states, added_cond_kwargs,
            timestep_cond=None, down_block_additional_residuals=None,
            mid_block_additional_residual=None):
    args = (sample, timesteps, encoder_hidden_states, added_cond_kwargs, timestep_cond,
            down_block_additional_residuals, mid_block_additional_residual)
    with contextlib.ExitStack() as interceptors:
      if LORA in variables:
        interceptors.enter_context(nn.intercept_methods(_apply_lora))
      interceptors.enter_context(nn.intercept_methods(patch_conv.on_cpu))  # inside LoRA's
      return UNetOutput(self.module.apply(variables, *args))

  def init_weights(self, rng):
    """Random parameters (``random_params``) in the scanned layout."""
    return random_params(self.module, smallest_inputs(self.config), rng)


def smallest_inputs(cfg):
  """The smallest inputs every level of a UNet (or ControlNet) ``config`` accepts: ``(sample,
  timesteps, context, added_cond_kwargs, timestep_cond)``, the sample
  ``2^(levels - 1)`` pixels square."""
  res, width = 2 ** (len(cfg["block_out_channels"]) - 1), cfg["cross_attention_dim"]
  pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
  cond_dim = cfg.get("time_cond_proj_dim")
  return (jnp.zeros((1, cfg["in_channels"], res, res)), jnp.ones((1,)), jnp.zeros((1, 1, width)),
          {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))},
          jnp.zeros((1, cond_dim)) if cond_dim else None)


class _ByRepr:
  """A Flax module as a static jit argument, equal to another when its ``repr`` (its class and
  every attribute, the config dict included) is: a module holding a dict has no hash."""

  def __init__(self, module):
    self.module, self.key = module, repr(module)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _ByRepr) and self.key == other.key


@functools.partial(jax.jit, static_argnums=0)
def _init_params(by_repr, rng, inputs):
  """``by_repr.module.init``'s parameters; traced once per architecture and input shapes (jit's
  cache) however many times a model is built."""
  return by_repr.module.init(rng, *inputs)["params"]


def random_params(module, inputs, rng):
  """Random parameters of ``module`` with Flax's default initialisers, drawn with numpy from the
  shapes of its init on ``inputs`` (``jax.eval_shape``: nothing is compiled): kernels LeCun
  normal ``N(0, 1 / fan_in)`` (fan_in: a Dense kernel's input width, a convolution's kh * kw *
  in; stacked blocks' kernels carry a leading block axis), biases 0, norm scales 1. ``rng`` (a
  PRNG key) seeds the draws."""
  shapes = _init_params.eval_shape(_ByRepr(module), rng, inputs)
  if isinstance(rng, jax.core.Tracer):  # under jax.eval_shape / jit: the shapes are what counts
    return jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
  key = rng if rng.dtype == np.uint32 else jax.random.key_data(rng)
  draws = np.random.default_rng(np.asarray(key).ravel().tolist())

  def draw(path, leaf):
    name = path[-1].key
    if name in ("scale", "bias"):
      return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
    fan_in = np.prod(leaf.shape[:3]) if leaf.ndim == 4 else leaf.shape[-2]
    return jnp.asarray(draws.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def check_supported(config, kind="UNet"):
  """A UserError naming the first field of a diffusers UNet (or, ``kind='ControlNet'``,
  ControlNet: no up blocks) config that this module does not build."""
  wanted = {"addition_embed_type": "text_time", "mid_block_type": "UNetMidBlock2DCrossAttn",
            "num_attention_heads": None, "only_cross_attention": False,
            "class_embed_type": None, "encoder_hid_dim": None}
  defaults = dict(wanted, addition_embed_type=None)  # diffusers' defaults of absent fields
  for field, value in wanted.items():
    got = config.get(field, defaults[field])
    if isinstance(got, (list, tuple)) and field == "only_cross_attention":
      got = any(got) or False
    if got != value:
      raise UserError(f"{kind} config {field}={got!r} is not supported by the scanned SDXL "
                      f"UNet (allowed: {value!r})")
  if kind != "UNet":
    return
  mirror = tuple(t.replace("Down", "Up") for t in reversed(config["down_block_types"]))
  if tuple(config["up_block_types"]) != mirror:
    raise UserError(f"UNet config up_block_types={tuple(config['up_block_types'])} is not "
                    f"supported (allowed: the mirror of down_block_types, {mirror})")


def unet(config, dtype=jnp.float32, remat="none", attention="xla"):
  """``SDXLUNet`` of a diffusers UNet ``config`` dict; ``remat`` a name of ``remat.POLICIES`` or
  one per level (``remat.per_level``), ``attention`` in ``ATTENTION``."""
  remat_lib.per_level(remat, len(config["block_out_channels"]), "UNet remat")
  if attention not in ATTENTION:
    raise UserError(f"UNet attention={attention!r} is not known; allowed: {ATTENTION}")
  check_supported(config)
  config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return SDXLUNet(ScannedUNet(config, remat, attention, dtype))
