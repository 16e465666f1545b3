"""Flax's parameter shape check, memoized for the tests.

On every ``apply``, Flax's ``Scope.param`` traces each existing parameter's initialiser
(``jax.eval_shape(lambda: init_fn(key, *init_args))``) to check that the stored parameter has the
shape the module would create. The tests apply their tiny models thousands of times, and these
traces were about a tenth of the suite's CPU time. ``install`` keeps the check and computes each
``(init_fn, init_args, init_kwargs)``'s shapes once: an initialiser is a pure function of its key
and arguments, so the memo gives the shapes a new trace would. Unhashable arguments are traced as
before. Production code runs Flax's own ``Scope.param``."""
import functools

import jax
import numpy as np
from flax import errors
from flax.core import meta
from flax.core import scope


@functools.lru_cache(maxsize=None)
def init_shapes(init_fn, init_args, init_kwargs):
  """The leaves' shapes of ``init_fn(key, *init_args, **init_kwargs)``, traced once."""
  out = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **dict(init_kwargs)))
  return tuple(np.shape(x) for x in jax.tree_util.tree_leaves(out))


def _param(self, flax_param, name, init_fn, *init_args, unbox=True, **init_kwargs):
  """``Scope.param``: an existing parameter checked against its memoized init shapes."""
  if not self.has_variable("params", name):
    return flax_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  key = (init_fn, init_args, tuple(sorted(init_kwargs.items())))
  try:
    hash(key)
  except TypeError:  # e.g. an array argument: Flax's own check
    return flax_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  self.reserve(name, "params")
  value = self.get_variable("params", name)
  if unbox:
    value = meta.unbox(value)
  for val, want in zip(jax.tree_util.tree_leaves(value), init_shapes(*key)):
    if np.shape(val) != want:
      raise errors.ScopeParamShapeError(name, self.path_text, np.shape(val), want)
  return value


def install():
  """Replaces ``flax.core.scope.Scope.param`` in this process (the test session)."""
  scope.Scope.param = functools.partialmethod(_param, scope.Scope.param)
