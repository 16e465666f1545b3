"""A full-size SDXL directory with random weights, in the layout of
stabilityai/stable-diffusion-xl-base-1.0 as downloaded with ``variant="fp16"``:

  python benchmarks/make_random_sdxl.py DIR [--seed=0]

unet/ (2,567,463,684 parameters, ``diffusion_pytorch_model.fp16.safetensors``), vae/,
text_encoder/ (CLIP ViT-L/14 text), text_encoder_2/ (OpenCLIP bigG text, with projection),
``model.fp16.safetensors`` each; tokenizer/ and tokenizer_2/ built from the real CLIP BPE
vocabulary that the open_clip_torch wheel ships (``bpe_simple_vocab_16e6.txt.gz``, read without
importing open_clip); scheduler/ and model_index.json, so diffusers'
``StableDiffusionXLPipeline.from_pretrained(DIR, variant="fp16")`` loads it. Nothing is
downloaded. The UNet is built on PyTorch's meta device and filled tensor by tensor in fp16
(no float32 copy of it); weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.02^2), biases
N(0, 0.02^2), so activations keep their scale through the network.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mcm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top,wrong-import-position
from mcm_jax.models import sdxl  # pylint: disable=g-import-not-at-top,wrong-import-position

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def random_tensor(name, shape, rng):
  """fp16 N(0, 1/fan_in) for weights, 1 + N(0, 0.02^2) for norm scales, N(0, 0.02^2) else."""
  if len(shape) >= 2:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(np.float16)
  x = 0.02 * rng.standard_normal(shape, np.float32)
  if "norm" in name and name.endswith("weight"):
    x += 1.0
  return x.astype(np.float16)


def write_unet(directory, seed):
  """unet/: config.json and the fp16 weights, made tensor by tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    unet = UNet2DConditionModel(**sdxl.SDXL_BASE_UNET_CONFIG)
  rng = np.random.default_rng(seed)
  tensors = {k: random_tensor(k, tuple(v.shape), rng) for k, v in unet.state_dict().items()}
  os.makedirs(os.path.join(directory, "unet"), exist_ok=True)
  unet.save_config(os.path.join(directory, "unet"))
  save_file(tensors, os.path.join(directory, "unet", "diffusion_pytorch_model.fp16.safetensors"))
  return sum(int(np.prod(v.shape)) for v in tensors.values())


def write_small_models(directory, seed):
  """vae/ and the two text encoders, built by their classes and saved as the fp16 variant."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  AutoencoderKL(**sdxl.SDXL_VAE_CONFIG).half().save_pretrained(os.path.join(directory, "vae"),
                                                                variant="fp16")
  CLIPTextModel(CLIPTextConfig(**CLIP_L)).half().save_pretrained(
      os.path.join(directory, "text_encoder"), variant="fp16")
  CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).half().save_pretrained(
      os.path.join(directory, "text_encoder_2"), variant="fp16")


def write_tokenizers(directory):
  """tokenizer/ (pad '<|endoftext|>') and tokenizer_2/ (pad '!'), as SDXL base ships them: CLIP's
  49,408-token byte-level BPE (``convert_open_clip.write_clip_tokenizer``)."""
  for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
    convert_open_clip.write_clip_tokenizer(os.path.join(directory, name), pad)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  d = args.directory
  write_tokenizers(d)
  write_small_models(d, args.seed)
  from diffusers import EulerDiscreteScheduler  # pylint: disable=g-import-not-at-top
  EulerDiscreteScheduler(**SCHEDULER).save_config(os.path.join(d, "scheduler"))
  with open(os.path.join(d, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=2)
  count = write_unet(d, args.seed)
  print(json.dumps({"directory": d, "unet_parameters": count}))


if __name__ == "__main__":
  main()
