"""Classifier-free guidance on a model's prediction, for any conditioning pytree.

``f_w = f_u + w (f_c - f_u)`` (w = 1: no guidance; LCM's ``(1 + w') f_c - w' f_u`` is the same
with ``w = 1 + w'``). For an epsilon model and an x-prediction at the same (z, t) the two forms
agree, since ``x = (z - sigma eps) / alpha`` is affine in eps: MLCM's eq. 8 on eps is this on x.
"""
import jax
import jax.numpy as jnp


def interleave(a, b):
  """``[a_0, b_0, a_1, b_1, ...]``: a doubled batch whose pairs sit side by side.

  On a batch-sharded mesh each device's slice of the result is made of its own slices of ``a``
  and ``b``, so doubling moves no data. ``jnp.concatenate([a, b])`` puts ``b`` a whole batch
  further on, which GSPMD can only lay out by regathering the batch: UViT-large's guided teacher
  at 128 px on v5e-256 (batch 2048, fsdp 16) then needs 16.94 GiB of temporaries per chip
  instead of 1.94 (``--mode=plan``, benchmarks/RESULTS.md)."""
  return jnp.stack([a, b], 1).reshape((-1,) + a.shape[1:])


def guided(f, z, t, cond, uncond, scale):
  """``(f_w, f_c)`` for ``f(z, t, cond)``: one call on the doubled batch (each conditional
  example next to its unconditional copy, ``interleave``); ``uncond`` leaves may have a
  leading 1 (broadcast to the batch); ``scale`` a number or one per example [B] (LCM's
  guidance-conditioned student draws it per example). ``uncond is None`` or ``scale == 1``: one
  conditional call, ``f_w = f_c``."""
  if uncond is None or (isinstance(scale, (int, float)) and scale == 1.0):
    f_c = f(z, t, cond)
    return f_c, f_c
  b = z.shape[0]
  uncond = jax.tree_util.tree_map(lambda u: jnp.broadcast_to(u, (b,) + u.shape[1:]), uncond)
  both = jax.tree_util.tree_map(interleave, cond, uncond)
  out = f(interleave(z, z), interleave(t, t), both)
  out = out.reshape((b, 2) + out.shape[1:])
  f_c, f_u = out[:, 0], out[:, 1]
  scale = jnp.asarray(scale)
  scale = scale.reshape(scale.shape + (1,) * (f_c.ndim - scale.ndim)) if scale.ndim else scale
  return f_u + scale * (f_c - f_u), f_c


def scale_embedding(w, dim):
  """LCM's guidance-scale embedding (the ``timestep_cond`` of a UNet with ``time_cond_proj_dim``;
  diffusers' ``get_guidance_scale_embedding``): for ``w`` [B] (LCM's omega, this project's scale
  minus 1), ``[sin(1000 w f_j), cos(1000 w f_j)]`` with ``f_j = 10000^(-j / (dim/2 - 1))``,
  ``j < dim / 2``, zero-padded to ``dim``; float32 [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = 1000.0 * jnp.asarray(w, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))
