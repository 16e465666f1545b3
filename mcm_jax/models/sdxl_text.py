"""SDXL's text conditioning: the two CLIP text encoders and tokenizers of a local SDXL directory
(``load_text_encoders``, as diffusers' SDXL pipeline encodes), stand-ins with their shapes for
tests, the tiny config and ``--mode=plan`` (``hashed_text_encoder``, ``zeros_text_encoder``), and
classifier-free guidance's unconditional branch (``unconditional``,
``force_zeros_for_empty_prompt``).
"""
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import UserError
from mcm_jax.models.sdxl import load_flax_transformer

CLIP_LENGTH = 77  # SDXL's tokenizers pad / truncate prompts to 77 tokens


def load_text_encoders(path, max_length=None):
  """SDXL's two CLIP text encoders and tokenizers from a local SDXL directory (``text_encoder``,
  ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``). Returns ``encode(prompts) ->
  {'context': [B, 77, D1 + D2], 'text_embeds': [B, P]}`` as in diffusers' SDXL pipeline: the
  penultimate hidden states of both encoders, concatenated, and encoder 2's projected pooled
  output. Jitted once; prompts are padded / truncated to the tokenizers' length."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  enc1, p1 = load_flax_transformer(FlaxCLIPTextModel, os.path.join(path, "text_encoder"))
  enc2, p2 = load_flax_transformer(FlaxCLIPTextModelWithProjection,
                                    os.path.join(path, "text_encoder_2"))
  tokenizers = []
  for name in ("tokenizer", "tokenizer_2"):
    directory = os.path.join(path, name)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"SDXL directory {path!r} has no {name}/")
    try:
      tokenizers.append(CLIPTokenizer.from_pretrained(directory, local_files_only=True))
    except (OSError, ValueError, TypeError) as e:
      raise UserError(f"{directory}: not a readable CLIP tokenizer ({type(e).__name__}: {e})"
                      ) from e

  @jax.jit
  def run(params1, params2, ids1, ids2):
    h1 = enc1(input_ids=ids1, params=params1, output_hidden_states=True).hidden_states[-2]
    out2 = enc2(input_ids=ids2, params=params2, output_hidden_states=True)
    return {"context": jnp.concatenate([h1, out2.hidden_states[-2]], -1),
            "text_embeds": out2.text_embeds}

  def encode(prompts):
    ids = [tok(list(prompts), padding="max_length", truncation=True, return_tensors="np",
               max_length=max_length or tok.model_max_length).input_ids for tok in tokenizers]
    return jax.tree_util.tree_map(np.asarray, run(p1, p2, *ids))

  return encode


def hashed_text_encoder(context_dim, pooled_dim, length=8, vocab=1024, seed=0):
  """A stand-in for SDXL's CLIP text encoders in tests and the tiny config: words -> ids by
  crc32 -> a fixed random table; ``encode(prompts) -> {'context' [B, L, D], 'text_embeds'
  [B, P]}`` (numpy). The empty prompt maps to zeros, like an unconditional embedding."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(vocab, context_dim)).astype(np.float32)
  proj = rng.normal(size=(context_dim, pooled_dim)).astype(np.float32) / np.sqrt(context_dim)

  def encode(prompts):
    context = np.zeros((len(prompts), length, context_dim), np.float32)
    for i, p in enumerate(prompts):
      ids = [zlib.crc32(w.encode()) % vocab for w in p.lower().split()][:length]
      context[i, :len(ids)] = table[ids]
    return {"context": context, "text_embeds": context.mean(1) @ proj}

  return encode


def text_widths(model):
  """(context width, pooled width) a UNet ``model`` expects from the text encoders: its
  cross-attention width, and the added-condition input less SDXL's 6 size / crop time ids."""
  cfg = model.config
  return (cfg["cross_attention_dim"],
          cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"])


def hashed_text_encoder_for(model, seed=0):
  """``hashed_text_encoder`` with the widths a UNet ``model`` expects."""
  return hashed_text_encoder(*text_widths(model), seed=seed)


def zeros_text_encoder(model, length=CLIP_LENGTH):
  """A stand-in with the output shapes of ``load_text_encoders`` for a UNet ``model`` (context
  [B, length, cross_attention_dim], text_embeds [B, pooled]), all zeros: ``--mode=plan``
  needs the shapes, not CLIP's weights."""
  width, pooled = text_widths(model)
  return lambda prompts: {
      "context": np.zeros((len(prompts), length, width), np.float32),
      "text_embeds": np.zeros((len(prompts), pooled), np.float32)}


def unconditional(encode, zeros, negative_prompt=""):
  """Classifier-free guidance's unconditional conditioning [1, ...] as diffusers' SDXL pipeline
  builds it: zero prompt embeddings (``zeros``) or ``encode([negative_prompt])``."""
  out = encode([negative_prompt])
  if zeros:
    out = dict(out, context=np.zeros_like(out["context"]),
               text_embeds=np.zeros_like(out["text_embeds"]))
  return out


def force_zeros_for_empty_prompt(path):
  """The SDXL pipeline's ``force_zeros_for_empty_prompt`` from ``path/model_index.json`` (its
  default, True, when the file or the key is absent): the unconditional branch is zero prompt
  embeddings rather than the embedding of ""."""
  index = os.path.join(path or "", "model_index.json")
  if not path or not os.path.isfile(index):
    return True
  try:
    with open(index) as f:
      return bool(json.load(f).get("force_zeros_for_empty_prompt", True))
  except ValueError as e:
    raise UserError(f"{index} is not valid JSON ({e})") from e
