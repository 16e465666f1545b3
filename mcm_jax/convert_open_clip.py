"""An open_clip CLIP checkpoint (HPSv2 / v2.1, LAION's ViT-H-14 and ViT-g-14) as a CLIP model
directory in transformers' layout, which ``scorers.load_clip`` (Flax) reads:

  python -m mcm_jax.convert_open_clip --checkpoint=HPS_v2.1_compressed.pt --model=ViT-H-14 \\
      --out=/models/hpsv2.1

Renames (q / k / v split from open_clip's fused ``in_proj``; projections transposed):
``token_embedding`` -> ``text_model.embeddings.token_embedding``, ``transformer.resblocks.i``
-> ``text_model.encoder.layers.i`` (``ln_1`` / ``ln_2`` -> ``layer_norm1`` / ``layer_norm2``,
``mlp.c_fc`` / ``c_proj`` -> ``mlp.fc1`` / ``fc2``, ``attn.out_proj`` -> ``self_attn.out_proj``),
``ln_final`` -> ``final_layer_norm``, ``visual.conv1`` -> ``patch_embedding``, ``visual.ln_pre``
/ ``ln_post`` -> ``pre_layrnorm`` / ``post_layernorm``, ``visual.proj`` / ``text_projection`` ->
``visual_projection`` / ``text_projection`` (transposed), ``logit_scale`` kept. Activations are
exact GELU (open_clip's default; ``--quick_gelu`` for OpenAI-trained weights). The tokenizer is
CLIP's byte-level BPE (from the open_clip_torch wheel, or ``--tokenizer=DIR``).
"""
import gzip
import importlib.util
import json
import os

import numpy as np
from absl import flags

from mcm_jax import cli, errors

# open_clip's architectures: attention heads (vision = width / head_width, text), by model name.
HEADS = {"ViT-B-32": (12, 8), "ViT-B-16": (12, 8), "ViT-L-14": (16, 12), "ViT-H-14": (16, 16),
         "ViT-g-14": (16, 16), "ViT-bigG-14": (16, 20)}
_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
          "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


def read_checkpoint(path):
  """An open_clip state dict (numpy) from ``path``: a bare state dict or {'state_dict': ...}
  (HPSv2's), ``module.`` prefixes (DDP) removed."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"open_clip checkpoint {path!r} not found")
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                           f"{e})") from e
  sd = sd.get("state_dict", sd)
  out = {k.removeprefix("module."): v.float().numpy() for k, v in sd.items()
         if hasattr(v, "numpy") and v.is_floating_point()}
  missing = [k for k in ("token_embedding.weight", "visual.conv1.weight", "text_projection")
             if k not in out]
  if missing:
    raise errors.UserError(f"{path}: not an open_clip CLIP checkpoint (no {missing}; keys "
                           f"{sorted(out)[:5]})")
  return out


def _tower(sd, prefix, out_prefix, out):
  """One transformer's blocks: open_clip ``prefix + 'resblocks.i.'`` -> transformers names."""
  i = 0
  while f"{prefix}resblocks.{i}.ln_1.weight" in sd:
    src, dst = f"{prefix}resblocks.{i}.", f"{out_prefix}encoder.layers.{i}."
    for name in ("weight", "bias"):
      q, k, v = np.split(sd[f"{src}attn.in_proj_{name}"], 3)
      out.update({f"{dst}self_attn.q_proj.{name}": q, f"{dst}self_attn.k_proj.{name}": k,
                  f"{dst}self_attn.v_proj.{name}": v})
      for old, new in _LAYER.items():
        out[f"{dst}{new}.{name}"] = sd[f"{src}{old}.{name}"]
    i += 1
  return i


def to_transformers(sd, vision_heads, text_heads, quick_gelu=False):
  """(transformers ``CLIPConfig`` kwargs, transformers-named state dict) of an open_clip
  state dict."""
  out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
         "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
         "text_model.final_layer_norm.weight": sd["ln_final.weight"],
         "text_model.final_layer_norm.bias": sd["ln_final.bias"],
         "text_projection.weight": sd["text_projection"].T,
         "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
         "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
         "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
         "visual_projection.weight": sd["visual.proj"].T,
         "logit_scale": np.asarray(sd["logit_scale"])}
  for src, dst in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                   ("visual.ln_post", "vision_model.post_layernorm")):
    out[dst + ".weight"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]
  text_layers = _tower(sd, "transformer.", "text_model.", out)
  vision_layers = _tower(sd, "visual.transformer.", "vision_model.", out)
  act = "quick_gelu" if quick_gelu else "gelu"
  vocab, width = sd["token_embedding.weight"].shape
  patch = sd["visual.conv1.weight"].shape[-1]
  v_width = sd["visual.class_embedding"].shape[-1]
  grid = int(round(np.sqrt(sd["visual.positional_embedding"].shape[0] - 1)))
  config = dict(
      projection_dim=sd["text_projection"].shape[1],
      text_config=dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, hidden_act=act,
                       intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                       max_position_embeddings=sd["positional_embedding"].shape[0],
                       bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
      vision_config=dict(hidden_size=v_width, num_hidden_layers=vision_layers,
                         num_attention_heads=vision_heads, hidden_act=act, patch_size=patch,
                         image_size=grid * patch, intermediate_size=sd[
                             "visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]))
  return config, out


def clip_bpe_vocabulary():
  """The path of CLIP's BPE merges shipped in the open_clip_torch wheel (located, not imported)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingExtraError("CLIP's BPE vocabulary comes from the open_clip_torch wheel: "
                                   "pip install open_clip_torch (or pass a tokenizer directory)")
  return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def write_clip_tokenizer(directory, pad="<|endoftext|>", max_length=77):
  """A transformers ``CLIPTokenizer`` in ``directory``: CLIP's 49,408-token byte-level BPE (OpenAI
  CLIP's ``SimpleTokenizer`` vocabulary construction), padding with ``pad``."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  from transformers.models.clip.tokenization_clip import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  with gzip.open(clip_bpe_vocabulary()) as f:
    merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  vocab = list(bytes_to_unicode().values())
  vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  staging = os.path.join(directory, ".bpe")
  os.makedirs(staging, exist_ok=True)
  vocab_file, merges_file = os.path.join(staging, "vocab.json"), os.path.join(staging, "m.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump({v: i for i, v in enumerate(vocab)}, f)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  CLIPTokenizer(vocab_file, merges_file, pad_token=pad, model_max_length=max_length
                ).save_pretrained(directory)


def convert(checkpoint, out, model="", heads=None, quick_gelu=False, tokenizer=""):
  """Writes ``out``: config.json + model.safetensors (transformers' CLIPModel) and a tokenizer.
  ``heads`` = (vision, text) attention heads, else ``HEADS[model]``."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if heads is None:
    if model not in HEADS:
      raise errors.UserError(f"model={model!r} is not known; allowed: {sorted(HEADS)} (or give "
                             "the vision and text attention heads)")
    heads = HEADS[model]
  sd = read_checkpoint(checkpoint)
  config, weights = to_transformers(sd, *heads, quick_gelu=quick_gelu)
  clip = transformers.CLIPModel(transformers.CLIPConfig(**config)).eval()
  missing, unexpected = clip.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                              for k, v in weights.items()}, strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]
  if missing or unexpected:
    raise errors.UserError(f"{checkpoint}: does not convert to a CLIP model (missing {missing[:3]},"
                           f" unexpected {unexpected[:3]})")
  clip.save_pretrained(out, safe_serialization=True)
  if tokenizer:
    transformers.CLIPTokenizer.from_pretrained(tokenizer, local_files_only=True
                                               ).save_pretrained(out)
  else:
    write_clip_tokenizer(out)
  return out


FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("checkpoint", None, "open_clip checkpoint (.pt / .bin), e.g. HPSv2.", **fv)
  flags.DEFINE_string("model", "ViT-H-14", f"open_clip architecture: {sorted(HEADS)}.", **fv)
  flags.DEFINE_string("out", None, "Output directory (transformers' CLIP layout).", **fv)
  flags.DEFINE_bool("quick_gelu", False, "QuickGELU activations (OpenAI-trained weights).", **fv)
  flags.DEFINE_string("tokenizer", "", "A CLIP tokenizer directory to copy (default: CLIP's BPE "
                      "from the open_clip_torch wheel).", **fv)


def parse_flags(argv, flag_values=FLAGS):
  """Defines and parses this program's flags (absl's flags_parser)."""
  define_flags(flag_values)
  return cli.parse_flags(argv, flag_values)


def main(argv, flag_values=FLAGS):
  del argv
  f = flag_values
  cli.require_flags(f, ("checkpoint", "out"))
  convert(f.checkpoint, f.out, f.model, quick_gelu=f.quick_gelu, tokenizer=f.tokenizer)


if __name__ == "__main__":
  cli.run(main, parse_flags)
