"""Rematerialisation policies by name, for the networks' ``remat`` settings.

What a block keeps for the backward pass: 'none' everything (no remat), 'full' only its inputs
(its forward runs again in the backward pass), 'dots' the outputs of its weight matmuls
(projections, MLPs; ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), recomputing
the rest: attention scores and softmax (O(tokens^2) per head), norms and activations;
'dots_convs' those and its convolutions' outputs (a ResBlock's two 3 x 3 convolutions), so the
backward pass recomputes no weight matmul or convolution (attention scores still).
"""
import flax.linen as nn
import jax

from mcm_jax.errors import UserError


def dots_and_convs_saveable(prim, *args, **params):
  """A ``jax.checkpoint`` policy: save weight-matmul outputs (``dots_with_no_batch_dims``) and
  convolution outputs."""
  return prim is jax.lax.conv_general_dilated_p or (
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "dots_convs": dots_and_convs_saveable}


def check(name, field="remat"):
  if name not in POLICIES:
    raise UserError(f"{field}={name!r} is not known; allowed: {sorted(POLICIES)}")


def per_level(spec, levels, field="remat"):
  """One policy name per network level from ``spec``: a name (every level) or comma-separated
  names, one per level from the finest (e.g. SDXL 'full,full,dots': keep the matmul outputs
  only at the 32 x 32 level, where attention is cheap to recompute and most blocks are)."""
  names = tuple(n.strip() for n in spec.split(","))
  for name in names:
    check(name, field)
  if len(names) == 1:
    return names * levels
  if len(names) != levels:
    raise UserError(f"{field}={spec!r} names {len(names)} policies; allowed: one, or one per "
                    f"level ({levels})")
  return names


def wrap(cls, name, **kwargs):
  """``cls`` (a Flax module class) under ``nn.remat`` with policy ``name``; 'none': ``cls``."""
  check(name)
  if name == "none":
    return cls
  return nn.remat(cls, policy=POLICIES[name], **kwargs)
