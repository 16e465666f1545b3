"""SDXL's ControlNet (diffusers' PyTorch ``ControlNetModel`` with text_time conditioning) on the
scanned UNet's parts, and a UNet with a ControlNet attached.

The ControlNet is the UNet's embeddings and down path (``sdxl_unet.embed_conditions``,
``sdxl_unet.down_path``: the same modules under the same names) with the control image's
embedding added after ``conv_in``, and zero convolutions reading the skips and the mid block:

  h_0 = conv_in(z) + E(control),   (skips, h_mid) = down_path(h_0),
  residual_i = s * zero_conv_i(skip_i),   mid = s * zero_conv_mid(h_mid)

with ``E`` = ``ControlNetConditioningEmbedding`` (3x3 convolutions with SiLU, stride 2 between
widths, a last convolution to the UNet's width), ``s`` the conditioning scale; with
``global_pool_conditions`` each residual is averaged over space. The UNet adds ``residual_i`` to
its skip ``i`` and ``mid`` to its mid block's output. Images enter in [0, 1], RGB (BGR
ControlNets get the channels flipped, as diffusers does). Its convolutions with few output
pixels run on CPU as one matrix product (``patch_conv``), as the UNet's do.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from flax import struct

from mcm_jax.errors import UserError
from mcm_jax.models import patch_conv
from mcm_jax.models import remat as remat_lib
from mcm_jax.models import sdxl_unet

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' default conditioning_embedding_out_channels
CHANNEL_ORDERS = ("rgb", "bgr")


class ConditioningEmbedding(nn.Module):
  """diffusers' ``ControlNetConditioningEmbedding``: ``conv_out(silu(...silu(conv_in(x))))``
  through ``blocks_<2i>`` (3x3, width ``channels[i]``) and ``blocks_<2i+1>`` (3x3, stride 2, to
  ``channels[i + 1]``), each followed by SiLU; NHWC."""
  out_channels: int
  channels: tuple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(sdxl_unet.conv3x3(self.channels[0], self.dtype, "conv_in")(x))
    for i, (width, wider) in enumerate(zip(self.channels[:-1], self.channels[1:])):
      x = nn.silu(sdxl_unet.conv3x3(width, self.dtype, f"blocks_{2 * i}")(x))
      x = nn.silu(sdxl_unet.conv3x3(wider, self.dtype, f"blocks_{2 * i + 1}", strides=2)(x))
    return sdxl_unet.conv3x3(self.out_channels, self.dtype, "conv_out")(x)


def _zero_conv(width, dtype, name):
  return nn.Conv(width, (1, 1), padding="VALID", dtype=dtype, name=name)


class ScannedControlNet(sdxl_unet.Network):
  """SDXL's ControlNet on the scanned layout; ``__call__(sample, timesteps, context,
  added_cond_kwargs, controlnet_cond, conditioning_scale)`` (sample and ``controlnet_cond``
  NCHW, the image in [0, 1] at the latents' size times ``2^(len(conditioning channels) - 1)``)
  returns ``(down_block_res_samples, mid_block_res_sample)`` NCHW, as diffusers'."""

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs,
               controlnet_cond, conditioning_scale=1.0):
    cfg, dtype, arch = self.config, self.dtype, sdxl_unet.Architecture.of(self.config)
    temb = sdxl_unet.embed_conditions(cfg, arch, dtype, sample.shape[0], timesteps,
                                      added_cond_kwargs)
    remat = remat_lib.per_level(self.remat, len(arch.channels), "ControlNet remat")
    common = dict(linear_projection=arch.linear, chunked=self.attention == "chunked",
                  dtype=dtype)
    image = sdxl_unet.nhwc(controlnet_cond)
    if cfg.get("controlnet_conditioning_channel_order", "rgb") == "bgr":
      image = image[..., ::-1]
    h = sdxl_unet.conv3x3(arch.channels[0], dtype, "conv_in")(sdxl_unet.nhwc(sample))
    h = h + ConditioningEmbedding(arch.channels[0], conditioning_channels(cfg), dtype,
                                  name="controlnet_cond_embedding")(image)
    h, skips = sdxl_unet.down_path(arch, remat, common, h, temb, encoder_hidden_states)
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    scale = scale.reshape(scale.shape + (1, 1, 1)) if scale.ndim else scale  # one per example
    down = [_zero_conv(s.shape[-1], dtype, f"controlnet_down_blocks_{i}")(s) * scale
            for i, s in enumerate(skips)]
    mid = _zero_conv(h.shape[-1], dtype, "controlnet_mid_block")(h) * scale
    if cfg.get("global_pool_conditions", False):
      down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
      mid = mid.mean(axis=(1, 2), keepdims=True)
    return [sdxl_unet.nchw(d) for d in down], sdxl_unet.nchw(mid)


def conditioning_channels(config):
  return tuple(config.get("conditioning_embedding_out_channels") or CONDITIONING_CHANNELS)


def pixel_factor(config):
  """How many control-image pixels make one latent pixel: ``2^(len(channels) - 1)``."""
  return 2 ** (len(conditioning_channels(config)) - 1)


@dataclasses.dataclass(frozen=True)
class SDXLControlNet:
  """The scanned ControlNet behind diffusers' interface: ``apply({'params': p}, sample,
  timesteps, context, added_cond_kwargs, controlnet_cond, conditioning_scale) -> (down, mid)``,
  ``init_weights(rng)``, ``config``."""
  module: ScannedControlNet

  @property
  def config(self):
    return self.module.config

  def apply(self, variables, *args, **kwargs):
    with nn.intercept_methods(patch_conv.on_cpu):
      return self.module.apply(variables, *args, **kwargs)

  def init_weights(self, rng):
    """Random parameters (``sdxl_unet.random_params``) in the scanned layout."""
    sample, *rest = sdxl_unet.smallest_inputs(self.config)
    factor = pixel_factor(self.config)
    image = jnp.zeros((1, self.config.get("conditioning_channels", 3),
                       sample.shape[2] * factor, sample.shape[3] * factor))
    return sdxl_unet.random_params(self.module, (sample, *rest[:3], image), rng)


@struct.dataclass
class Controlled:
  """UNet parameters (plain or ``sdxl_unet.Adapted``) with a ControlNet's: what the eps function
  of a UNet with a ControlNet attached takes (``sdxl.make_eps_fn(model, controlnet)``)."""
  unet: object
  controlnet: dict


def check_fits(config, unet_config):
  """A UserError when a ControlNet ``config`` cannot run with the UNet of ``unet_config`` (both
  with tuples for lists, as ``sdxl_unet.unet`` keeps its config): another UNet architecture (its
  residuals would not fit the UNet's skips) or an option this module does not build."""
  sdxl_unet.check_supported(config, "ControlNet")
  for field in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
    mine, theirs = config.get(field), unet_config.get(field)
    if mine != theirs:
      raise UserError(f"a ControlNet of another architecture: {field}={mine!r}, the "
                      f"UNet's is {theirs!r} (allowed: the UNet's)")
  order = config.get("controlnet_conditioning_channel_order", "rgb")
  if order not in CHANNEL_ORDERS:
    raise UserError(f"controlnet_conditioning_channel_order={order!r} is not known; "
                    f"allowed: {CHANNEL_ORDERS}")
  groups = config.get("norm_num_groups", 32)
  if groups != 32:
    raise UserError(f"ControlNet config norm_num_groups={groups} is not supported (allowed: 32)")


def controlnet(config, unet_config, dtype=jnp.float32, remat="none", attention="xla"):
  """``SDXLControlNet`` of a diffusers ControlNet ``config`` dict, checked against the UNet's
  (``check_fits``)."""
  config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  check_fits(config, unet_config)
  return SDXLControlNet(ScannedControlNet(config, remat, attention, dtype))
