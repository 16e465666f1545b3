"""BLIP's image-grounded text encoder in Flax, as ImageReward uses it (Xu et al. 2023):

  image tokens = ViT(image)                       timm-style ViT: [CLS] + patches + positions,
                                                  pre-norm blocks (LayerNorm eps 1e-6, exact GELU)
  text states  = BERT(ids, mask; image tokens)    post-norm BERT layers: self-attention,
                                                  cross-attention to the image tokens, MLP
  reward       = (MLP(text states[:, 0]) - mean) / std     a linear chain (no activations)

Parameter names follow ImageReward's checkpoint (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``) so ``params_from_state_dict`` maps it key by key.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward v1.0's reward normalisation
IMAGEREWARD_STD = 1.0333394966054072
MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of ImageReward's MLP head (between them: dropout)


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """ViT (``vision_*``) and BERT (``text_*``, from ``med_config.json``) sizes."""
  image_size: int = 224
  patch_size: int = 16
  vision_width: int = 1024
  vision_depth: int = 24
  vision_heads: int = 16
  text_width: int = 768
  text_depth: int = 12
  text_heads: int = 12
  text_intermediate: int = 3072
  vocab_size: int = 30524
  max_positions: int = 512
  text_eps: float = 1e-12


def _attention(q, k, v, heads, bias=None):
  """softmax(q k^T / sqrt(d) + bias) v over ``heads`` heads; q [B, L, D], k / v [B, S, D]."""
  b, l, d = q.shape
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d // heads)
  scores = jnp.einsum("blhd,bshd->bhls", split(q), split(k)) / np.sqrt(d // heads)
  if bias is not None:
    scores = scores + bias
  return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(scores, -1), split(v)).reshape(b, l, d)


class VitBlock(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(1e-6, name="norm1")(x)
    q, k, v = jnp.split(nn.Dense(3 * self.width, name="attn_qkv")(h), 3, -1)
    x = x + nn.Dense(self.width, name="attn_proj")(_attention(q, k, v, self.heads))
    h = nn.LayerNorm(1e-6, name="norm2")(x)
    h = nn.Dense(self.width, name="mlp_fc2")(
        nn.gelu(nn.Dense(4 * self.width, name="mlp_fc1")(h), approximate=False))
    return x + h


class VisionTransformer(nn.Module):
  """[B, 3, H, W] CLIP-normalised pixels -> [B, 1 + patches, width] (after the final norm)."""
  config: BlipConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    x = nn.Conv(c.vision_width, (c.patch_size, c.patch_size), (c.patch_size, c.patch_size),
                padding="VALID", name="patch_embed")(jnp.transpose(pixels, (0, 2, 3, 1)))
    x = x.reshape(x.shape[0], -1, c.vision_width)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c.vision_width))
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, 1 + (c.image_size // c.patch_size) ** 2, c.vision_width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.vision_width)), x], 1) + pos
    for i in range(c.vision_depth):
      x = VitBlock(c.vision_width, c.vision_heads, name=f"blocks_{i}")(x)
    return nn.LayerNorm(1e-6, name="norm")(x)


class BertAttention(nn.Module):
  """Post-norm attention: ``LayerNorm(x + dense(attention(x W_q, y W_k, y W_v)))``."""
  width: int
  heads: int
  eps: float

  @nn.compact
  def __call__(self, x, y, bias=None):
    q = nn.Dense(self.width, name="query")(x)
    k, v = nn.Dense(self.width, name="key")(y), nn.Dense(self.width, name="value")(y)
    out = nn.Dense(self.width, name="output_dense")(_attention(q, k, v, self.heads, bias))
    return nn.LayerNorm(self.eps, name="output_LayerNorm")(x + out)


class TextEncoder(nn.Module):
  """BERT with cross-attention to ``image`` tokens: ``(ids [B, L], mask [B, L], image [B, S,
  Dv]) -> [B, L, width]`` (padding masked with -10000 as BLIP's med.py does)."""
  config: BlipConfig

  @nn.compact
  def __call__(self, ids, mask, image):
    c = self.config
    x = nn.Embed(c.vocab_size, c.text_width, name="word_embeddings")(ids)
    x = x + nn.Embed(c.max_positions, c.text_width, name="position_embeddings")(
        jnp.arange(ids.shape[1])[None])
    x = nn.LayerNorm(c.text_eps, name="embeddings_LayerNorm")(x)
    bias = (1.0 - mask[:, None, None, :].astype(x.dtype)) * -10000.0
    for i in range(c.text_depth):
      x = BertAttention(c.text_width, c.text_heads, c.text_eps, name=f"layer_{i}_attention")(
          x, x, bias)
      x = BertAttention(c.text_width, c.text_heads, c.text_eps,
                        name=f"layer_{i}_crossattention")(x, image)
      h = nn.gelu(nn.Dense(c.text_intermediate, name=f"layer_{i}_intermediate")(x),
                  approximate=False)
      x = nn.LayerNorm(c.text_eps, name=f"layer_{i}_output_LayerNorm")(
          x + nn.Dense(c.text_width, name=f"layer_{i}_output_dense")(h))
    return x


class ImageReward(nn.Module):
  """``(pixels [B, 3, S, S], ids, mask) -> [B]`` normalised ImageReward scores."""
  config: BlipConfig

  @nn.compact
  def __call__(self, pixels, ids, mask):
    image = VisionTransformer(self.config, name="visual_encoder")(pixels)
    h = TextEncoder(self.config, name="text_encoder")(ids, mask, image)[:, 0]
    for i, width in zip(MLP_LAYERS, (1024, 128, 64, 16, 1)):
      h = nn.Dense(width, name=f"mlp_{i}")(h)
    return (h[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def config_from_state_dict(sd, med_config):
  """The ``BlipConfig`` of an ImageReward state dict (ViT sizes from the weights' shapes, 64-wide
  heads as in BLIP's ViT-B / ViT-L) and its ``med_config.json`` (a dict)."""
  pos = sd["blip.visual_encoder.pos_embed"].shape
  patch = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
  width = pos[-1]
  depth = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
  return BlipConfig(
      image_size=int(round(np.sqrt(pos[1] - 1))) * patch, patch_size=patch, vision_width=width,
      vision_depth=depth, vision_heads=width // 64, text_width=med_config["hidden_size"],
      text_depth=med_config["num_hidden_layers"], text_heads=med_config["num_attention_heads"],
      text_intermediate=med_config["intermediate_size"], vocab_size=med_config["vocab_size"],
      max_positions=med_config["max_position_embeddings"],
      text_eps=med_config.get("layer_norm_eps", 1e-12))


def params_from_state_dict(sd, config):
  """Flax params of ``ImageReward`` from ImageReward's PyTorch state dict (numpy arrays)."""
  def dense(prefix):
    return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

  def norm(prefix):
    return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

  v = "blip.visual_encoder."
  vision = {"patch_embed": {"kernel": sd[v + "patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                            "bias": sd[v + "patch_embed.proj.bias"]},
            "cls_token": sd[v + "cls_token"], "pos_embed": sd[v + "pos_embed"],
            "norm": norm(v + "norm")}
  for i in range(config.vision_depth):
    b = f"{v}blocks.{i}."
    vision[f"blocks_{i}"] = {"norm1": norm(b + "norm1"), "attn_qkv": dense(b + "attn.qkv"),
                             "attn_proj": dense(b + "attn.proj"), "norm2": norm(b + "norm2"),
                             "mlp_fc1": dense(b + "mlp.fc1"), "mlp_fc2": dense(b + "mlp.fc2")}
  t = "blip.text_encoder."
  text = {"word_embeddings": {"embedding": sd[t + "embeddings.word_embeddings.weight"]},
          "position_embeddings": {"embedding": sd[t + "embeddings.position_embeddings.weight"]},
          "embeddings_LayerNorm": norm(t + "embeddings.LayerNorm")}
  for i in range(config.text_depth):
    layer = f"{t}encoder.layer.{i}."
    for kind in ("attention", "crossattention"):
      text[f"layer_{i}_{kind}"] = {
          "query": dense(layer + kind + ".self.query"), "key": dense(layer + kind + ".self.key"),
          "value": dense(layer + kind + ".self.value"),
          "output_dense": dense(layer + kind + ".output.dense"),
          "output_LayerNorm": norm(layer + kind + ".output.LayerNorm")}
    text[f"layer_{i}_intermediate"] = dense(layer + "intermediate.dense")
    text[f"layer_{i}_output_dense"] = dense(layer + "output.dense")
    text[f"layer_{i}_output_LayerNorm"] = norm(layer + "output.LayerNorm")
  params = {"visual_encoder": vision, "text_encoder": text}
  params.update({f"mlp_{i}": dense(f"mlp.layers.{i}") for i in MLP_LAYERS})
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
