"""Named random streams: one independent stream per (seed, purpose).

  key(seed, name)     = fold_in(PRNGKey(seed), stream_id(name))      (JAX)
  entropy(seed, name) = [seed, stream_id(name)]                        (numpy SeedSequence)

``stream_id`` is a CRC-32 of the name, so a stream's values do not depend on which other
streams exist, and seed s of one purpose never reproduces another purpose's seed s'
(as ``PRNGKey(seed + offset)`` would for s' = s + offset).
"""
import zlib

import jax


def stream_id(name):
  """A 31-bit integer naming a stream: CRC-32 of ``name``."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def key(seed, name):
  """The JAX key of stream ``name`` under ``seed``."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream_id(name))


def entropy(seed, name):
  """Entropy for ``np.random.default_rng`` of stream ``name`` under ``seed``."""
  return [int(seed), stream_id(name)]
