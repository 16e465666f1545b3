"""Preference scorers and MLCM's reward losses (SPEC section 6).

Scorer: ``score(images [B, H, W, 3] in [-1, 1]) -> [B]``. Shipped: the LAION aesthetic
predictor = CLIP ViT-L/14 image embedding (transformers' Flax CLIP vision model with projection,
L2-normalised) -> the predictor's head, both from local files:
- the head's PyTorch state dict (``.pth``, read with ``weights_only=True``; or ``.npz`` /
  ``.safetensors`` of the same keys): the MLP ``layers.{0,2,4,6,7}.{weight,bias}`` (768 -> 1024
  -> 128 -> 64 -> 16 -> 1, no activations, as released) or a linear ``weight [1, 768]``, ``bias``.
- CLIP preprocessing: bicubic resize of the short side to 224, centre crop, CLIP mean / std.

Losses: reward consistency ``(s(D(z_hat)) - s(D(sg z_ref)))^2`` and feedback learning
``max(s0 - s(x0), 0)`` (s0 = 8.0 for the aesthetic score, 2.0 for ImageReward); MLCM's total is
``L_MLCD + L_RC + 1e-3 L_FL``.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from mcm_jax.errors import UserError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
MLP_LAYERS = (0, 2, 4, 6, 7)
THRESHOLDS = {"aesthetic": 8.0, "imagereward": 2.0}  # the feedback hinge's s0 (MLCM 3.4)


def scorer_names(value):
  """The scorers of a ``rewards.scorer`` value: '' = none, one name of ``THRESHOLDS``, or
  several joined by '+' (e.g. 'imagereward+aesthetic', MLCM's pair), in that order."""
  return tuple(n for n in value.split("+") if n) if value else ()


def clip_preprocess(images, size=224):
  """[-1, 1] NHWC -> CLIP pixel values NCHW: short side to ``size`` (bicubic), centre crop."""
  b, h, w, c = images.shape
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = jax.image.resize((images + 1) / 2, (b, nh, nw, c), "bicubic", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = x[:, top:top + size, left:left + size]
  x = (x - CLIP_MEAN) / CLIP_STD
  return jnp.transpose(x, (0, 3, 1, 2))


def load_head(path):
  """The aesthetic head as a list of (weight [out, in], bias [out]) float32 numpy pairs."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"aesthetic head weights {path!r} not found (a local copy of the "
                            "LAION aesthetic predictor's .pth, or .npz / .safetensors of it)")
  if path.endswith(".npz"):
    with np.load(path) as f:
      sd = dict(f)
  elif path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    sd = {k: v.numpy() for k, v in torch.load(path, map_location="cpu",
                                              weights_only=True).items()}
  if "weight" in sd and "bias" in sd:
    return [(np.asarray(sd["weight"], np.float32), np.asarray(sd["bias"], np.float32))]
  missing = [f"layers.{i}.{p}" for i in MLP_LAYERS for p in ("weight", "bias")
             if f"layers.{i}.{p}" not in sd]
  if missing:
    raise UserError(f"{path}: not an aesthetic head (missing {missing[:3]}; keys "
                    f"{sorted(sd)[:6]})")
  return [(np.asarray(sd[f"layers.{i}.weight"], np.float32),
           np.asarray(sd[f"layers.{i}.bias"], np.float32)) for i in MLP_LAYERS]


def clip_image_embedder(clip_dir):
  """(``embed(params, pixel_values NCHW) -> [B, projection_dim]``, params, image size,
  projection dim) from a local CLIP dir:
  a whole CLIP model (e.g. openai/clip-vit-large-patch14) or a vision model with projection
  (transformers has no Flax class for the latter: the vision tower + its ``visual_projection``
  read from the safetensors file)."""
  import json  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPModel, FlaxCLIPVisionModel  # pylint: disable=g-import-not-at-top
  from mcm_jax.models.sdxl import load_flax_transformer  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(clip_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"CLIP directory {clip_dir!r} has no config.json")
  with open(config_path) as f:
    model_type = json.load(f).get("model_type")
  if model_type == "clip":
    model, params = load_flax_transformer(FlaxCLIPModel, clip_dir)
    embed = lambda p, px: model.get_image_features(pixel_values=px, params=p)
    return embed, params, model.config.vision_config.image_size, model.config.projection_dim
  if model_type != "clip_vision_model":
    raise UserError(f"{config_path}: model_type={model_type!r}; allowed: 'clip', "
                    "'clip_vision_model'")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model, params = load_flax_transformer(FlaxCLIPVisionModel, clip_dir,
                                        unused=("position_ids", "visual_projection.weight"))
  weights = load_file(os.path.join(clip_dir, "model.safetensors"))
  if "visual_projection.weight" not in weights:
    raise UserError(f"{clip_dir}: no visual_projection.weight (not a CLIP vision model with "
                    "projection)")
  proj = jnp.asarray(weights["visual_projection.weight"], jnp.float32)  # [proj, hidden]
  return (projected_embedder(model), {"tower": params, "proj": proj}, model.config.image_size,
          proj.shape[0])


def projected_embedder(model):
  """``embed(params, pixel_values)`` of a transformers Flax CLIP vision tower and its
  projection: ``pooler_output @ proj^T`` with ``params = {'tower', 'proj' [proj, hidden]}``."""
  return lambda p, px: model(pixel_values=px, params=p["tower"]).pooler_output @ p["proj"].T


def aesthetic_scorer(clip_dir, head_path):
  """(``score(params, images) -> [B]``, params): jit-able, differentiable in the images; the
  weights are an argument (sharded / donated like any other frozen tree, not jit constants)."""
  embed, clip_params, size, dim = clip_image_embedder(clip_dir)
  head = [(jnp.asarray(w), jnp.asarray(b)) for w, b in load_head(head_path)]
  if head[0][0].shape[1] != dim:
    raise UserError(f"aesthetic head takes {head[0][0].shape[1]}-d embeddings; the CLIP model "
                    f"in {clip_dir} gives {dim}")
  return aesthetic_score_fn(embed, size), {"clip": clip_params, "head": head}


# The published predictor's sizes: CLIP ViT-L/14 (openai/clip-vit-large-patch14) and LAION's
# MLP head (what --mode=plan uses when the files are not on the planning machine).
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu")
HEAD_WIDTHS = (768, 1024, 128, 64, 16, 1)


def abstract_aesthetic_scorer():
  """(score, params as ShapeDtypeStructs) of the published aesthetic predictor (``CLIP_VIT_L14``
  with its projection, ``HEAD_WIDTHS``): nothing is read or allocated."""
  from transformers import CLIPVisionConfig, FlaxCLIPVisionModel  # pylint: disable=g-import-not-at-top
  config = CLIPVisionConfig(**CLIP_VIT_L14)
  model = FlaxCLIPVisionModel(config, _do_init=False)
  tower = jax.eval_shape(lambda key: model.init_weights(
      key, (1, config.image_size, config.image_size, 3)), jax.random.PRNGKey(0))
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  head = [(f32(o, i), f32(o)) for i, o in zip(HEAD_WIDTHS[:-1], HEAD_WIDTHS[1:])]
  params = {"clip": {"tower": tower, "proj": f32(config.projection_dim, config.hidden_size)},
            "head": head}
  return aesthetic_score_fn(projected_embedder(model), config.image_size), params


def aesthetic_score_fn(embed, size):
  """``score(params, images)``: the head on the L2-normalised CLIP embedding of ``images``
  (``params = {'clip', 'head'}``)."""

  def score(params, images):
    emb = embed(params["clip"], clip_preprocess(images, size))
    h = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    for w, b in params["head"]:
      h = h @ w.T + b
    return h[:, 0]

  return score


def reward_consistency(score_fn, images_pred, images_ref):
  """Per-example ``sum_j (s_j(x_pred) - s_j(sg x_ref))^2`` over the scorers ``j`` (``score_fn``
  returns [B] for one scorer or [B, S] for several)."""
  diff = score_fn(images_pred) - jax.lax.stop_gradient(score_fn(images_ref))
  return jnp.sum((diff ** 2).reshape(diff.shape[0], -1), axis=1)


def feedback(score_fn, images, threshold):
  """Per-example hinge ``sum_j max(s0_j - s_j(x), 0)`` (``threshold`` a number or one per
  scorer)."""
  s = score_fn(images)
  s = s.reshape(s.shape[0], -1)
  return jnp.sum(jnp.maximum(jnp.asarray(threshold, s.dtype) - s, 0.0), axis=1)
