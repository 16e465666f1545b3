"""Rematerialisation policies by name, for the networks' ``remat`` settings.

What a block keeps for the backward pass: 'none' everything (no remat), 'full' only its inputs
(its forward runs again in the backward pass), 'dots' the outputs of its weight matmuls
(projections, MLPs; ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), recomputing
the rest: attention scores and softmax (O(tokens^2) per head), norms and activations.
"""
import flax.linen as nn
import jax

from mcm_jax.errors import UserError

POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check(name, field="remat"):
  if name not in POLICIES:
    raise UserError(f"{field}={name!r} is not known; allowed: {sorted(POLICIES)}")


def wrap(cls, name, **kwargs):
  """``cls`` (a Flax module class) under ``nn.remat`` with policy ``name``; 'none': ``cls``."""
  check(name)
  if name == "none":
    return cls
  return nn.remat(cls, policy=POLICIES[name], **kwargs)
