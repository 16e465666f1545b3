"""Samplers: pure JAX functions over a model function ``f(z, t) -> x_hat``."""
from mcm_jax.samplers import addim, baselines, discrete, dpm_solver  # noqa: F401
