"""MCM ImageNet128 (ct): `get_config('small' | 'large' | 'tiny')` (tiny = digits 16x16, CPU).

All fields and their comments: configs/pixel.py.
"""
from configs import pixel


def get_config(size="small"):
  return pixel.pixel_config(resolution=128, objective="ct", size=size)
