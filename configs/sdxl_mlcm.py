"""MLCM on SDXL (LoRA, progressive stages, image-free): `get_config('sdxl' | 'tiny')`.

'sdxl': the paper's settings; point config.student_unet (and optionally config.teacher_unet)
at local diffusers-layout SDXL directories and config.prompts at a local prompt file.
'tiny': a random tiny SDXL-architecture UNet, for CPU tests. Fields: mcm_jax.latent.
"""
from mcm_jax.latent import default_config


def get_config(size="sdxl"):
  return default_config(size)
