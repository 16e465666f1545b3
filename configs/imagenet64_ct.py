"""MCM ImageNet64 (ct): `get_config('small' | 'large' | 'tiny')` (tiny = digits 16x16, CPU).

All fields and their comments: mcm_jax.pixel.default_config.
"""
from mcm_jax.pixel import default_config


def get_config(size="small"):
  return default_config(resolution=64, size=size, objective="ct")
