"""Classifier-free guidance on a model's prediction, for any conditioning pytree.

``f_w = f_u + w (f_c - f_u)`` (w = 1: no guidance; LCM's ``(1 + w') f_c - w' f_u`` is the same
with ``w = 1 + w'``). For an epsilon model and an x-prediction at the same (z, t) the two forms
agree, since ``x = (z - sigma eps) / alpha`` is affine in eps: MLCM's eq. 8 on eps is this on x.
"""
import jax
import jax.numpy as jnp


def guided(f, z, t, cond, uncond, scale):
  """``(f_w, f_c)`` for ``f(z, t, cond)``: one call on the doubled batch (conditional half
  first); ``uncond`` leaves may have a leading 1 (broadcast to the batch). ``uncond is None`` or
  ``scale == 1``: one conditional call, ``f_w = f_c``."""
  if uncond is None or (isinstance(scale, (int, float)) and scale == 1.0):
    f_c = f(z, t, cond)
    return f_c, f_c
  b = z.shape[0]
  uncond = jax.tree_util.tree_map(lambda u: jnp.broadcast_to(u, (b,) + u.shape[1:]), uncond)
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
  out = f(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both)
  f_c, f_u = jnp.split(out, 2)
  return f_u + scale * (f_c - f_u), f_c
