"""SDXL's UNet with each transformer stack under ``nn.scan``, optionally rematerialised.

diffusers' ``FlaxUNet2DConditionModel`` unrolls SDXL's 70 transformer blocks, so one UNet call
is 70 copies of the block in XLA's program and an MLCM step (guided teacher, image-free latents,
student target, student forward and backward) is five such UNets: compiling it for a TPU pod
takes longer than an hour and more than 23 GB of host memory. Here the ``depth`` blocks of each
``Transformer2D`` (1, 2 or 10 in SDXL) are one scanned block with stacked weights, and the
block may be rematerialised under a policy (``mcm_jax.models.remat``).

The function is diffusers' UNet: the same leaves (``FlaxResnetBlock2D``, ``FlaxDownsample2D``,
``FlaxUpsample2D``, ``FlaxTimesteps``, ``FlaxTimestepEmbedding``, ``FlaxBasicTransformerBlock``)
wired as ``FlaxUNet2DConditionModel`` wires them, for the configurations SDXL uses (text_time
added conditioning, ``UNetMidBlock2DCrossAttn``). Parameters are kept in diffusers' layout
(``.../transformer_blocks_<i>/...``), which the loaders, LoRA and its export read; ``SDXLUNet``
stacks them into the scanned layout (``.../transformer_blocks/...`` with a leading ``depth``
axis) inside ``apply``, so callers see diffusers' interface: ``apply({'params': p}, sample NCHW,
timesteps, encoder_hidden_states, added_cond_kwargs).sample``, ``init_weights``, ``config``.
"""
import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mcm_jax.errors import UserError
from mcm_jax.models import remat as remat_lib

ATTENTION = ("xla", "chunked")  # chunked: diffusers' memory-efficient (query/key chunked) kernel
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
  from diffusers.models import attention_flax, embeddings_flax, resnet_flax  # pylint: disable=g-import-not-at-top
  return attention_flax, embeddings_flax, resnet_flax


class _ScannedBlock(nn.Module):
  """One ``FlaxBasicTransformerBlock`` as a scan body: ``(h, context) -> (block(h), None)``."""
  dim: int
  heads: int
  chunked: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, hidden, context):
    attention_flax, _, _ = _leaves()
    block = attention_flax.FlaxBasicTransformerBlock(
        self.dim, self.heads, self.dim // self.heads, use_memory_efficient_attention=self.chunked,
        dtype=self.dtype, name="block")
    return block(hidden, context), None


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
    body = remat_lib.wrap(_ScannedBlock, self.remat, prevent_cse=False)  # prevent_cse: not in scan
    blocks = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=self.depth)
    x, _ = blocks(c, self.heads, self.chunked, self.dtype, name="transformer_blocks")(x, context)
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
    _, _, resnet_flax = _leaves()
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
    _, _, resnet_flax = _leaves()
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
    _, _, resnet_flax = _leaves()
    self.resnets = [resnet_flax.FlaxResnetBlock2D(in_channels=self.channels,
                                                  out_channels=self.channels, dtype=self.dtype)
                    for _ in range(2)]
    self.attentions = self.transformers(1)

  def __call__(self, hidden, temb, context):
    hidden = self.resnets[0](hidden, temb)
    return self.resnets[1](self.attentions[0](hidden, context), temb)


class ScannedUNet(nn.Module):
  """SDXL's UNet on the scanned parameter layout; ``__call__`` as diffusers' (NCHW in, NCHW out).
  ``config``: the fields of a diffusers UNet ``config.json`` that SDXL uses."""
  config: dict
  remat: str = "none"
  attention: str = "xla"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
    _, embeddings_flax, _ = _leaves()
    cfg, dtype, chunked = self.config, self.dtype, self.attention == "chunked"
    channels = tuple(cfg["block_out_channels"])
    levels = len(channels)
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels
    heads = per_level(cfg["attention_head_dim"])  # diffusers reads it as the number of heads
    depths = per_level(cfg.get("transformer_layers_per_block", 1))
    cross = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    linear, layers = cfg.get("use_linear_projection", False), cfg["layers_per_block"]
    flip, shift = cfg.get("flip_sin_to_cos", True), cfg.get("freq_shift", 0)

    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (sample.shape[0],))
    temb = embeddings_flax.FlaxTimesteps(channels[0], flip_sin_to_cos=flip, freq_shift=shift,
                                         name="time_proj")(timesteps)
    temb = embeddings_flax.FlaxTimestepEmbedding(channels[0] * 4, dtype=dtype,
                                                 name="time_embedding")(temb)
    text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
    time_embeds = embeddings_flax.FlaxTimesteps(cfg["addition_time_embed_dim"], flip, shift,
                                                name="add_time_proj")(jnp.ravel(time_ids))
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
    temb = temb + embeddings_flax.FlaxTimestepEmbedding(channels[0] * 4, dtype=dtype,
                                                        name="add_embedding")(
        jnp.concatenate([text_embeds, time_embeds], axis=-1))

    remat = remat_lib.per_level(self.remat, levels, "UNet remat")
    common = dict(linear_projection=linear, chunked=chunked, dtype=dtype)
    h = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name="conv_in")(
        jnp.transpose(sample, (0, 2, 3, 1)))
    skips = (h,)
    for i in range(levels):
      h, outputs = DownBlock(
          heads=heads[i], depth=depths[i] if cross[i] else 0, in_channels=channels[max(i - 1, 0)],
          out_channels=channels[i], num_layers=layers, add_downsample=i < levels - 1,
          remat=remat[i], name=f"down_blocks_{i}", **common)(h, temb, encoder_hidden_states)
      skips += outputs
    h = MidBlock(heads=heads[-1], depth=depths[-1], channels=channels[-1], remat=remat[-1],
                 name="mid_block", **common)(h, temb, encoder_hidden_states)
    up = channels[::-1]
    for i in range(levels):
      level = levels - 1 - i
      skips, level_skips = skips[:-(layers + 1)], skips[-(layers + 1):]
      h = UpBlock(
          heads=heads[level], depth=depths[level] if cross[level] else 0,
          in_channels=up[min(i + 1, levels - 1)], out_channels=up[i],
          prev_output_channel=up[max(i - 1, 0)], num_layers=layers + 1,
          add_upsample=i < levels - 1, remat=remat[level], name=f"up_blocks_{i}", **common)(
              h, level_skips, temb, encoder_hidden_states)
    h = nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="conv_norm_out")(h))
    h = nn.Conv(cfg["out_channels"], (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                name="conv_out")(h)
    return jnp.transpose(h, (0, 3, 1, 2))


def stack_blocks(params):
  """diffusers' layout -> the scanned one: every ``transformer_blocks_<i>`` (i = 0..depth-1)
  subtree becomes ``transformer_blocks/block`` with the blocks' leaves stacked on axis 0."""
  if not isinstance(params, dict):
    return params
  out, blocks = {}, {}
  for key, value in params.items():
    m = _BLOCKS.match(key)
    if m:
      blocks[int(m.group(1))] = value
    else:
      out[key] = stack_blocks(value)
  if blocks:
    ordered = [blocks[i] for i in range(len(blocks))]
    out["transformer_blocks"] = {"block": jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *ordered)}
  return out


def unstack_blocks(params):
  """The scanned layout -> diffusers' (inverse of ``stack_blocks``)."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "transformer_blocks":
      depth = jax.tree_util.tree_leaves(value)[0].shape[0]
      for i in range(depth):
        out[f"transformer_blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i],
                                                                value["block"])
    else:
      out[key] = unstack_blocks(value)
  return out


@struct.dataclass
class UNetOutput:
  """What diffusers' UNet returns: ``.sample`` (a pytree, so jitted functions may return it)."""
  sample: jax.Array


@dataclasses.dataclass(frozen=True)
class SDXLUNet:
  """The scanned UNet behind diffusers' model interface, on diffusers' parameter layout:
  ``apply({'params': p}, sample, timesteps, context, added_cond_kwargs).sample``,
  ``init_weights(rng)``, ``config`` (the diffusers config dict)."""
  module: ScannedUNet

  @property
  def config(self):
    return self.module.config

  @property
  def dtype(self):
    return self.module.dtype

  def apply(self, variables, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
    out = self.module.apply({"params": stack_blocks(variables["params"])}, sample, timesteps,
                            encoder_hidden_states, added_cond_kwargs)
    return UNetOutput(out)

  def init_weights(self, rng):
    cfg = self.config
    res, width = cfg["sample_size"], cfg["cross_attention_dim"]
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    params = self.module.init(rng, jnp.zeros((1, cfg["in_channels"], res, res)), jnp.ones((1,)),
                              jnp.zeros((1, 1, width)),
                              {"text_embeds": jnp.zeros((1, pooled)),
                               "time_ids": jnp.zeros((1, 6))})["params"]
    return unstack_blocks(params)


def check_supported(config):
  """A UserError naming the first field of a diffusers UNet config this UNet does not build."""
  wanted = {"addition_embed_type": "text_time", "mid_block_type": "UNetMidBlock2DCrossAttn",
            "num_attention_heads": None, "only_cross_attention": False,
            "class_embed_type": None, "encoder_hid_dim": None}
  for field, value in wanted.items():
    got = config.get(field, value)
    if isinstance(got, (list, tuple)) and field == "only_cross_attention":
      got = any(got) or False
    if got != value:
      raise UserError(f"UNet config {field}={got!r} is not supported by the scanned SDXL UNet "
                      f"(allowed: {value!r})")
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
