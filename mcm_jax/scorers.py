"""Text-image scores, jit-able, from the published files in local directories:

  CLIP score  = 100 max(cos(E_I, E_T), 0)       torchmetrics' definition; MLCM and LCM report it
                                               with ViT-g/14 (any transformers-layout CLIP loads)
  PickScore   = exp(logit_scale) cos(E_I, E_T)   Kirstain et al. 2023: a fine-tuned CLIP ViT-H/14
                                               (yuvalkirstain/PickScore_v1), logit_scale its own
  ImageReward = (MLP(BLIP(image, prompt)) - mean) / std     Xu et al. 2023 (``models.blip``)
  HPSv2       = cos(E_I, E_T)                   Wu et al. 2023: an open_clip ViT-H/14 fine-tune,
                                               converted by ``convert_open_clip``

E_I is the projected image embedding of the CLIP-preprocessed image (``rewards.clip_preprocess``:
bicubic short side to the model's size, centre crop, CLIP mean / std; ImageReward preprocesses
the same way at 224), E_T the projected text embedding of the prompt padded / truncated to the
tokenizer's length. Each scorer is ``score(params, images [-1, 1] NHWC, tokenize(prompts))``.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax import rewards
from mcm_jax.errors import UserError
from mcm_jax.models import blip


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


@dataclasses.dataclass
class Scorer:
  """``score(params, images [-1, 1] NHWC, tokens) -> [B]``; ``tokenize(texts) -> tokens`` for a
  prompt-conditioned scorer, None for one that ignores the prompt (``tokens`` is then None)."""
  score: object
  params: dict
  tokenize: object = None


def load_aesthetic(clip_dir, head_path):
  """The LAION aesthetic predictor (``rewards.aesthetic_scorer``) as a prompt-free ``Scorer``."""
  score, params = rewards.aesthetic_scorer(clip_dir, head_path)
  return Scorer(lambda p, images, tokens: score(p, images), params)


IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
IMAGEREWARD_TEXT_LENGTH = 35


def load_imagereward(directory, tokenizer_dir=None):
  """ImageReward v1.0 as a ``Scorer`` from a local directory holding ``ImageReward.pt`` and
  ``med_config.json`` (the files THUDM/ImageReward publishes) and, unless ``tokenizer_dir`` is
  given, the BERT uncased tokenizer files (``vocab.txt``, as in bert-base-uncased); its tokens are
  ``(input_ids, attention_mask)`` padded / truncated to 35, as ImageReward's BLIP tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
  for name in IMAGEREWARD_FILES:
    if not os.path.isfile(os.path.join(directory, name)):
      raise FileNotFoundError(f"ImageReward directory {directory!r} has no {name} (it needs "
                              f"{' and '.join(IMAGEREWARD_FILES)}, as THUDM/ImageReward ships)")
  weights_path = os.path.join(directory, "ImageReward.pt")
  try:
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{weights_path}: not a readable PyTorch state dict ({type(e).__name__}: "
                    f"{e})") from e
  sd = {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}
  try:
    with open(os.path.join(directory, "med_config.json")) as f:
      med = json.load(f)
    config = blip.config_from_state_dict(sd, med)
    params = blip.params_from_state_dict(sd, config)
  except (KeyError, ValueError) as e:
    raise UserError(f"{directory}: not an ImageReward checkpoint ({type(e).__name__}: {e})"
                    ) from e
  model = blip.ImageReward(config)
  size = config.image_size
  want = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, size, size)),
                        jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"]
  got = jax.tree_util.tree_map(lambda a: a.shape, params)
  if jax.tree_util.tree_map(lambda a: a.shape, want) != got:
    raise UserError(f"{weights_path}: weights do not fit the architecture of {directory}/"
                    "med_config.json (a different BLIP or text encoder size)")
  tokenizer_dir = tokenizer_dir or directory
  try:
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"{tokenizer_dir}: no BERT tokenizer (ImageReward needs bert-base-uncased's "
                    f"vocab.txt there) ({type(e).__name__}: {e})") from e

  def tokenize(texts):
    out = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="np",
                    max_length=IMAGEREWARD_TEXT_LENGTH)
    return np.asarray(out.input_ids), np.asarray(out.attention_mask)

  return Scorer(_imagereward_score_fn(model, size), params, tokenize)


def _imagereward_score_fn(model, size):
  def score(p, images, tokens):
    ids, mask = tokens
    return model.apply({"params": p}, rewards.clip_preprocess(images, size), ids, mask)
  return score


def combine(named):
  """One ``Scorer`` of several ({name: Scorer}, at most one prompt-conditioned): ``score`` gives
  [B, S], the scorers in order; params {name: params}."""
  tokenizers = [s.tokenize for s in named.values() if s.tokenize is not None]
  if len(tokenizers) > 1:
    raise UserError(f"scorers {sorted(named)}: at most one may read the prompt")

  def score(p, images, tokens):
    return jnp.stack([s.score(p[n], images, tokens if s.tokenize else None)
                      for n, s in named.items()], axis=-1)

  return Scorer(score, {n: s.params for n, s in named.items()},
                tokenizers[0] if tokenizers else None)


def abstract_scorer(name):
  """The ``Scorer`` of ``rewards.THRESHOLDS``' ``name`` at its published size on shapes (params
  ShapeDtypeStructs, tokens of the right shape): ImageReward v1.0 (``blip.BlipConfig``'s
  defaults: BLIP ViT-L/16 at 224 px, BERT-base) or the LAION aesthetic predictor on CLIP
  ViT-L/14; what ``--mode=plan`` compiles when the files are not on the planning machine."""
  if name == "aesthetic":
    score, params = rewards.abstract_aesthetic_scorer()
    return Scorer(lambda p, images, tokens: score(p, images), params)
  config = blip.BlipConfig()
  model, size = blip.ImageReward(config), config.image_size
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, size, size)),
                          jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"]
  shape = lambda texts: (len(texts), IMAGEREWARD_TEXT_LENGTH)
  return Scorer(_imagereward_score_fn(model, size), params,
                lambda texts: (np.zeros(shape(texts), np.int64), np.ones(shape(texts), np.int64)))


def hps_score(model):
  """``score(params, images, input_ids) -> [B]``: HPSv2's cos (an open_clip checkpoint converted
  by ``convert_open_clip``)."""
  return model.cosine
