"""mcm_jax: Multistep Consistency Models (MCM) and multistep latent consistency (MLCM) in JAX."""
__version__ = "0.1.0"
