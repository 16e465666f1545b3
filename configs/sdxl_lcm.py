"""LCM's guidance-conditioned student of SDXL (LCM §4.2, Alg. 3): the whole UNet distilled by
latent consistency distillation with w drawn per example: `get_config('sdxl' | 'tiny')`.

One segment (K = 1: the consistency function maps any z_t to the clean latent; sampled with
LCM's multistep re-noising, `generate --sampler=lcm --timesteps=lcm --unet=.../stage0/unet`),
skip k = 20 with the DDIM teacher (LCM Tables 1-2), each example's teacher guided at w ~ U[3, 15]
(LCM's omega in [2, 14]; omega = w - 1) and the student given w through a guidance embedding
(unet.time_cond_proj_dim = 256, added to SDXL's UNet with a zero projection). Real latents noised
by the forward process (LCM Alg. 3: images with captions in images.dir, their VAE latents
cached in images.cache_dir). LCM's optimiser settings (§5: learning rate 8e-6); LCM trains
with batch 72 at 512 px and 16 at 768 px and gives no 1024 px batch: 24 here, as MLCM's.
The target is the stop-gradient student (as MLCM and LCM-LoRA), not LCM's EMA target network.
Each stage exports `stage0/unet/` (diffusers' UNet layout, float16, `time_cond_proj_dim` in its
config: what `UNet2DConditionModel.from_pretrained(dir, variant='fp16')` loads).
'tiny': the settings shrunk for CPU tests (random tiny UNet, hashed text, image-free latents).
"""
from configs import sdxl_mlcm

SIZES = sdxl_mlcm.SIZES


def get_config(size="sdxl"):
  c = sdxl_mlcm.get_config(size)
  c.trainable = "unet"
  c.mlcm.update(num_segments=1, num_stages=1, skip=20, guidance_range=(3.0, 15.0),
                source="images")
  c.images.dir = "/data/laion_aesthetics_6plus"
  c.images.cache_dir = "/data/laion_aesthetics_6plus_latents"
  c.train.steps = 100_000  # LCM §5
  c.train.optim.learning_rate = 8e-6
  # The whole UNet's gradients and Adam moments leave less HBM for activations than a LoRA's:
  # every level rematerialised (MLCM's 'full,full,dots' does not fit v6e-8 at batch 24 here).
  c.unet.remat = "full"
  if size == "tiny":
    c.update_from_flattened_dict({"mlcm.source": "mdi", "images.dir": "", "images.cache_dir": "",
                                  "train.steps": 3, "train.optim.learning_rate": 1e-4})
  return c
