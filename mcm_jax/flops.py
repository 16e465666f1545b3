"""FLOPs of a step: counted from its jaxpr (``jaxpr_flops``), and XLA's own count of a compiled
executable (``compiled_flops``)."""
import jax
import numpy as np


def jaxpr_flops(jaxpr):
  """FLOPs of the matrix products and convolutions of a (closed) jaxpr, 2 per multiply-add:
  ``dot_general`` 2 x |out| x |contracted|, ``conv_general_dilated`` 2 x |out| x |kernel| /
  out-features; a ``scan`` body counts ``length`` times, a ``cond`` its largest branch, every
  other sub-program (jit, remat, custom derivatives, a while body) once. XLA's own
  ``cost_analysis`` counts a loop body once whatever its trip count, so it undercounts scanned
  models; this counts what the program asks for, including rematerialisation by ``jax.checkpoint``
  (not what XLA adds on its own to fit memory)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * size(eqn.outvars[0].aval.shape) * size([lhs[d] for d in contract])
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * size(eqn.outvars[0].aval.shape) * size(rhs) // out_features
    subs = [v for v in eqn.params.values() if _is_jaxpr(v)]
    branches = [b for v in eqn.params.values() if isinstance(v, (tuple, list))
                for b in v if _is_jaxpr(b)]
    if name == "cond":
      total += max(jaxpr_flops(b) for b in branches)
    else:
      inner = sum(jaxpr_flops(j) for j in subs + branches)
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def _is_jaxpr(v):
  return isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))


def size(shape):
  return int(np.prod(shape, dtype=np.int64))


def compiled_flops(compiled):
  """XLA's FLOPs per device of a compiled executable (None when the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
  return float(cost["flops"]) if cost and "flops" in cost else None
