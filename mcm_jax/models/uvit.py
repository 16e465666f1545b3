"""UViT (simple diffusion, Hoogeboom et al. 2023) as used by MCM for ImageNet 64 / 128.

A UNet whose stages at attention resolutions are transformer blocks (MLP instead of
convolutions). ``(z [B, H, W, C], logsnr [B], label [B] or None) -> prediction [B, H, W, C]``.

Stages (MCM App. A): ImageNet64 small: down = 3 ResNet blocks @256, avg-pool, 3 transformer
blocks @512, avg-pool; middle = 16 transformer blocks @1024 (MLP ratio 4, dropout 0.2); up
mirrors down with nearest-neighbour upsampling. Large = channels x2, dropout 0.1 everywhere.
ImageNet128 adds 3 ResNet blocks @128 at 128x128 at both ends.

Inferred (the paper gives stages, channels, dropout and totals only): every block is conditioned
by a scale/shift ``Dense(2 ch)`` of a shared embedding (sinusoidal logsnr features -> MLP, plus a
class embedding with a null class for guidance); up blocks concatenate the matching down block's
output (UNet skips); attention heads are 64 wide. Without the conditioning projections the
convolution / attention / MLP weights of the small 64 model are only ~227M, so the rest of the
reported totals must come from conditioning; its width ``emb_dim`` is not given and is set to
3584 for every size, which puts all four totals within 3% of the reported ones (401M vs 394M,
1.249B vs 1.23B at 64; 408M vs 397M, 1.269B vs 1.25B at 128; tests/test_uvit.py). A width of
4096 overshoots by 5-10%, 3072 undershoots by 2-5%.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import UserError
from mcm_jax.models import remat
from mcm_jax.models.mlp import position_embedding


def logsnr_features(logsnr, dim=256):
  """Sinusoidal features of logsnr / 2 (periods covering the schedule's range [-15, 15])."""
  half = dim // 2
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half)
  ang = (logsnr * 0.5)[:, None] * freqs[None] * 100.0 / 15.0
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)


class ResBlock(nn.Module):
  channels: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train):
    h = nn.swish(nn.GroupNorm(num_groups=min(32, x.shape[-1]), dtype=self.dtype)(x))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
    scale, shift = jnp.split(nn.Dense(2 * self.channels, dtype=self.dtype)(emb), 2, -1)
    h = nn.GroupNorm(num_groups=min(32, self.channels), dtype=self.dtype)(h)
    h = h * (1 + scale[:, None, None]) + shift[:, None, None]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels, dtype=self.dtype)(x)
    return x + h


class TransformerBlock(nn.Module):
  """Pre-LN attention + MLP on the [B, H, W, C] grid flattened to tokens, conditioned by
  scale/shift of the first norm. Attention: ``jax.nn.dot_product_attention``."""
  channels: int
  mlp_ratio: int = 4
  head_dim: int = 64
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train):
    b, hgt, wid, _ = x.shape
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels, dtype=self.dtype)(x)
    x = x.reshape(b, hgt * wid, self.channels)
    scale, shift = jnp.split(nn.Dense(2 * self.channels, dtype=self.dtype)(emb), 2, -1)
    h = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(x)
    h = h * (1 + scale[:, None]) + shift[:, None]
    heads = self.channels // self.head_dim
    qkv = nn.DenseGeneral((3, heads, self.head_dim), dtype=self.dtype)(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = jax.nn.dot_product_attention(q, k, v)
    attn = nn.DenseGeneral(self.channels, axis=(-2, -1), kernel_init=nn.initializers.zeros,
                           dtype=self.dtype)(attn)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(attn)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.channels, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(self.channels, kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    return (x + h).reshape(b, hgt, wid, self.channels)


class UViT(nn.Module):
  """``stages``: (kind, channels, num_blocks, dropout) per down stage, kind 'res' or 'attn';
  each down stage ends with a 2x average pool and the up path mirrors it. ``segment`` [B] (a
  multistep student's position within its segment, ``consistency.segment_position``) adds an
  embedding whose layer starts at zero, so the student starts as its base model."""
  stages: Sequence[tuple]
  mid_channels: int = 1024
  mid_blocks: int = 16
  mid_dropout: float = 0.2
  mlp_ratio: int = 4
  emb_dim: int = 3584
  num_classes: int = 1000
  out_channels: int = 3
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"  # a policy of mcm_jax.models.remat for every block

  @nn.compact
  def __call__(self, z, logsnr, label=None, train=False, segment=None):
    emb = nn.swish(nn.Dense(self.emb_dim, dtype=self.dtype)(logsnr_features(logsnr)))
    emb = nn.Dense(self.emb_dim, dtype=self.dtype)(emb)
    if self.num_classes:
      if label is None:
        label = jnp.full(z.shape[:1], self.num_classes, jnp.int32)  # the null class
      emb = emb + nn.Embed(self.num_classes + 1, self.emb_dim, dtype=self.dtype)(label)
    if segment is not None:  # a multistep student's position in its segment, zero at init
      emb = emb + nn.Dense(self.emb_dim, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                           name="segment_embed")(position_embedding(segment))
    emb = nn.swish(emb)

    def block(name, kind, channels, dropout):
      """A block with an explicit name, so params are the same with and without remat."""
      cls = ResBlock if kind == "res" else functools.partial(
          TransformerBlock, mlp_ratio=self.mlp_ratio)
      cls = remat.wrap(cls, self.remat, static_argnums=(3,))
      return cls(channels, dropout=dropout, dtype=self.dtype, name=name)

    h = nn.Conv(self.stages[0][1], (3, 3), dtype=self.dtype)(z.astype(self.dtype))
    skips = []
    for i, (kind, channels, num_blocks, dropout) in enumerate(self.stages):
      for j in range(num_blocks):
        h = block(f"down_{i}_{j}", kind, channels, dropout)(h, emb, train)
        skips.append(h)
      b, hh, ww, c = h.shape
      h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    for j in range(self.mid_blocks):
      h = block(f"mid_{j}", "attn", self.mid_channels, self.mid_dropout)(h, emb, train)
    for i, (kind, channels, num_blocks, dropout) in reversed(list(enumerate(self.stages))):
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      for j in range(num_blocks):
        h = block(f"up_{i}_{j}", kind, channels, dropout)(
            jnp.concatenate([h, skips.pop()], -1), emb, train)
    h = nn.swish(nn.GroupNorm(num_groups=min(32, h.shape[-1]), dtype=self.dtype)(h))
    out = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros,
                  dtype=self.dtype)(h)
    return out.astype(jnp.float32)


def uvit_config(resolution, size):
  """Constructor kwargs for MCM's UViTs: resolution 64 or 128, size 'small', 'large' or
  'tiny' (tests)."""
  if resolution not in (64, 128) or size not in ("tiny", "small", "large"):
    raise UserError(f"UViT resolution={resolution!r}, size={size!r}; allowed: 64 / 128 and "
                    "'tiny' / 'small' / 'large'")
  if size == "tiny":
    stages = [("res", 32, 1, 0.0), ("attn", 64, 1, 0.0)]
    if resolution == 128:
      stages = [("res", 32, 1, 0.0)] + stages
    return dict(stages=tuple(stages), mid_channels=64, mid_blocks=1, mid_dropout=0.0,
                emb_dim=64, num_classes=10)
  mult = 2 if size == "large" else 1
  block_dropout = 0.1 if size == "large" else 0.0
  stages = [("res", 256 * mult, 3, block_dropout if resolution == 128 else 0.0),
            ("attn", 512 * mult, 3, block_dropout)]
  if resolution == 128:  # extra 128x128 ResNet stage; never dropout at 128 (paper App. A)
    stages = [("res", 128 * mult, 3, 0.0)] + stages
  if resolution == 64:
    mid_dropout = 0.1 if size == "large" else 0.2
  else:
    mid_dropout = 0.1
  return dict(stages=tuple(stages), mid_channels=1024 * mult, mid_blocks=16,
              mid_dropout=mid_dropout, emb_dim=3584, num_classes=1000)
