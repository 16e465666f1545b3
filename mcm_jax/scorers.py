"""Text-image agreement scores on a CLIP model in the transformers layout (jit-able):

  CLIP score = 100 max(cos(E_I, E_T), 0)        torchmetrics' definition; MLCM and LCM report it
                                                with ViT-g/14 (a ViT-L/14 also loads here)
  PickScore  = exp(logit_scale) cos(E_I, E_T)    Kirstain et al. 2023: a fine-tuned CLIP ViT-H/14
                                                (yuvalkirstain/PickScore_v1), logit_scale its own

E_I is the projected image embedding of the CLIP-preprocessed image (``rewards.clip_preprocess``:
bicubic short side to the model's size, centre crop, CLIP mean / std), E_T the projected text
embedding of the prompt padded / truncated to the tokenizer's length.
"""
import dataclasses

import jax.numpy as jnp

from mcm_jax import rewards


@dataclasses.dataclass
class ClipModel:
  """``cosine(params, images [-1, 1] NHWC, input_ids [B, L]) -> [B]``; ``tokenize(texts) ->
  input_ids``; ``params`` holds ``logit_scale`` (a scalar) with the model's weights."""
  cosine: object
  params: dict
  tokenize: object


def load_clip(clip_dir):
  """A whole local CLIP model directory (model + tokenizer) as a ``ClipModel``."""
  from transformers import CLIPTokenizer, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  from mcm_jax.models.sdxl import load_flax_transformer  # pylint: disable=g-import-not-at-top
  model, params = load_flax_transformer(FlaxCLIPModel, clip_dir)
  tokenizer = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
  size = model.config.vision_config.image_size

  def cosine(p, images, input_ids):
    img = model.get_image_features(pixel_values=rewards.clip_preprocess(images, size), params=p)
    txt = model.get_text_features(input_ids=input_ids, params=p)
    return jnp.sum(img * txt, -1) / (jnp.linalg.norm(img, axis=-1)
                                     * jnp.linalg.norm(txt, axis=-1))

  def tokenize(texts):
    return tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="np",
                     max_length=tokenizer.model_max_length).input_ids

  return ClipModel(cosine, params, tokenize)


def clip_score(model):
  """``score(params, images, input_ids) -> [B]``: 100 max(cos, 0)."""
  return lambda p, images, ids: 100.0 * jnp.maximum(model.cosine(p, images, ids), 0.0)


def pick_score(model):
  """``score(params, images, input_ids) -> [B]``: exp(logit_scale) cos."""
  return lambda p, images, ids: jnp.exp(p["logit_scale"]) * model.cosine(p, images, ids)
