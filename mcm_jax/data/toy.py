"""Low-dimensional toy distributions, sampled in JAX (jit-able, deterministic per key).

Each sampler is ``sample(rng, n) -> [n, D]`` float32, roughly unit scale. ``mixture1d`` is the
two-Gaussian mixture of MCM Fig. 1. ``as_sampler`` also turns any [N, D] array (or an iterable
of [n, D] arrays) that a Python caller brings into such a sampler.
"""
import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import UserError


def ring8(rng, n):
  """Eight Gaussians (std 0.1) on a circle of radius 1.4 (scaled to about unit variance)."""
  k1, k2 = jax.random.split(rng)
  angle = jax.random.randint(k1, (n,), 0, 8) * (2 * np.pi / 8)
  centers = 1.4 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
  return centers + 0.1 * jax.random.normal(k2, (n, 2))


def checkerboard(rng, n):
  """A 4x4 checkerboard of uniform squares on [-2, 2]^2, scaled by 0.7."""
  k1, k2, k3 = jax.random.split(rng, 3)
  x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
  x2 = jax.random.uniform(k2, (n,), minval=0.0, maxval=1.0)
  x2 = x2 + jax.random.randint(k3, (n,), 0, 2) * 2.0 - 2.0 + (jnp.floor(x1) % 2)
  return 0.7 * jnp.stack([x1, x2], -1)


def moons(rng, n):
  """Two interleaved half circles with Gaussian noise (std 0.08), centred."""
  k1, k2, k3 = jax.random.split(rng, 3)
  which = jax.random.bernoulli(k1, 0.5, (n,))
  a = jax.random.uniform(k2, (n,), maxval=np.pi)
  upper = jnp.stack([jnp.cos(a), jnp.sin(a)], -1)
  lower = jnp.stack([1.0 - jnp.cos(a), 0.5 - jnp.sin(a)], -1)
  pts = jnp.where(which[:, None], upper, lower) - jnp.array([0.5, 0.25])
  return 1.2 * pts + 0.08 * jax.random.normal(k3, (n, 2))


def swissroll(rng, n):
  """A 2-D swiss roll with noise (std 0.05), scaled to about unit variance."""
  k1, k2 = jax.random.split(rng)
  r = 1.5 * np.pi * (1.0 + 2.0 * jax.random.uniform(k1, (n,)))
  pts = jnp.stack([r * jnp.cos(r), r * jnp.sin(r)], -1) / 7.5
  return pts + 0.05 * jax.random.normal(k2, (n, 2))


def mixture1d(rng, n):
  """MCM Fig. 1: ``0.5 N(-1, 0.15^2) + 0.5 N(1, 0.15^2)``, shape [n, 1]."""
  k1, k2 = jax.random.split(rng)
  sign = jnp.where(jax.random.bernoulli(k1, 0.5, (n, 1)), 1.0, -1.0)
  return sign + 0.15 * jax.random.normal(k2, (n, 1))


DATASETS = {"ring8": ring8, "checkerboard": checkerboard, "moons": moons,
            "swissroll": swissroll, "mixture1d": mixture1d}


def get_sampler(name):
  if name not in DATASETS:
    raise UserError(f"data.name={name!r} is not known; allowed: {sorted(DATASETS)}")
  return DATASETS[name]


def as_sampler(source, max_points=1 << 20):
  """A sampler ``(rng, n) -> [n, D]`` from a name, a sampler, an [N, D] array, or an iterable
  yielding [n, D] arrays (read until ``max_points`` rows). Arrays are resampled uniformly."""
  if isinstance(source, str):
    return get_sampler(source)
  if callable(source):
    return source
  if not hasattr(source, "shape"):
    chunks, rows = [], 0
    for chunk in source:
      chunk = np.asarray(chunk, np.float32)
      chunks.append(chunk)
      rows += len(chunk)
      if rows >= max_points:
        break
    source = np.concatenate(chunks)[:max_points] if chunks else np.zeros((0, 0))
  data = jnp.asarray(source, jnp.float32)
  if data.ndim != 2 or data.shape[0] < 2:
    raise UserError(f"a data source must give [N, D] arrays with N >= 2; got shape {data.shape}")
  return lambda rng, n: data[jax.random.randint(rng, (n,), 0, data.shape[0])]
