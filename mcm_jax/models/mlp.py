"""A residual MLP denoiser for low-dimensional toy data (the embedded CPU default)."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def logsnr_embedding(logsnr, num_freqs=16):
  """Fourier features of ``c = 2/pi atan(exp(-logsnr / 2))`` (= t under the cosine schedule)."""
  c = jnp.arctan(jnp.exp(-0.5 * logsnr)) * (2.0 / np.pi)
  freqs = np.pi * 2.0 ** np.arange(num_freqs // 2, dtype=np.float32)
  ang = c[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang), c[:, None]], axis=-1)


def position_embedding(position, num_freqs=16):
  """Fourier features of a position in [0, 1] (``position`` [B])."""
  freqs = np.pi * 2.0 ** np.arange(num_freqs // 2, dtype=np.float32)
  ang = position[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang), position[:, None]], axis=-1)


class MLPDenoiser(nn.Module):
  """``(z [B, D], logsnr [B], cond [B] int or None, segment [B] or None) -> prediction [B, D]``.

  ``num_classes > 0`` adds a label embedding with one extra "null" label (index num_classes)
  for classifier-free guidance. ``segment`` (a multistep student's position within its segment,
  ``consistency.segment_position``) adds an embedding whose layer starts at zero, so a student
  initialised from the teacher starts as the teacher. The output layer starts at zero.
  """
  hidden: int = 256
  depth: int = 4
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, cond=None, segment=None):
    emb = nn.Dense(self.hidden, dtype=self.dtype)(logsnr_embedding(logsnr))
    if segment is not None:
      emb = emb + nn.Dense(self.hidden, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                           name="segment_embed")(position_embedding(segment))
    if self.num_classes:
      if cond is None:
        cond = jnp.full(z.shape[:1], self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, self.hidden, dtype=self.dtype)(cond)
    emb = nn.silu(emb)
    h = nn.Dense(self.hidden, dtype=self.dtype)(z)
    for _ in range(self.depth):
      r = nn.LayerNorm(dtype=self.dtype)(h)
      r = nn.Dense(self.hidden, dtype=self.dtype)(nn.silu(r + nn.Dense(self.hidden)(emb)))
      r = nn.Dense(self.hidden, dtype=self.dtype)(nn.silu(r))
      h = h + r
    h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
    return nn.Dense(z.shape[-1], kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
