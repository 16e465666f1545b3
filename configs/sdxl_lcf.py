"""Latent consistency fine-tuning (LCF, LCM §4.4 and Alg. 4) of a distilled SDXL LoRA on a folder
of images with captions: `get_config('sdxl' | 'tiny')`.

Consistency training in latent space, no teacher: each image's VAE latent z is noised to t_m and,
with the same noise, to t_n = max(t_m - k, segment start) (`mlcm.teacher_step='data'`), and the
student's two DDIM endpoints at the segment start are pulled together (MLCM eq. 7; the target is
the stop-gradient student, as LCM-LoRA's training). The LoRA starts from `lora.init_from`, the
distilled student (an MLCM stage's `lora/pytorch_lora_weights.safetensors`, K segments = its step
count). LCM's settings (§5.3): learning rate 8e-6, 30k iterations, skip k = 20, 4-step students;
LCM gives no batch size for LCF (MLCM's 24 is kept).
Point student_unet at the SDXL directory the LoRA was distilled on (its VAE encodes the images),
images.dir at the folder and lora.init_from at the LoRA.
'tiny': the settings shrunk for CPU tests; the test sets the three paths.
"""
from configs import sdxl_mlcm

SIZES = sdxl_mlcm.SIZES


def get_config(size="sdxl"):
  c = sdxl_mlcm.get_config(size)
  c.lora.init_from = "/models/mlcm_sdxl_lora/pytorch_lora_weights.safetensors"
  c.images.dir = "/data/my_style_images"
  # latents encoded once; '' = encoded in every step
  c.images.cache_dir = "/data/my_style_images_latents"
  c.mlcm.update(source="images", teacher_step="data", num_segments=4, skip=20, num_stages=1)
  c.train.steps = 30_000
  c.train.optim.learning_rate = 8e-6
  if size == "tiny":
    c.update_from_flattened_dict({"lora.init_from": "", "images.dir": "", "images.cache_dir": "",
                                  "train.steps": 3, "train.optim.learning_rate": 1e-4})
  return c
