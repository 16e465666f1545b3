"""Seconds per image of each evaluation scorer at its published size (random weights), so a
5k-prompt evaluation can be budgeted: one JSON line.

  python benchmarks/scorers.py [--cache=~/.cache/mcm_jax/scorers_random] [--batch=4]

Models (written once into ``--cache`` with random weights in the published layouts, nothing
downloaded): CLIP ViT-L/14 (CLIP score, the aesthetic head's backbone), CLIP ViT-H/14
(PickScore; HPSv2 has the same architecture), CLIP ViT-g/14 (MLCM's CLIP score), ImageReward
(BLIP ViT-L/16 + BERT-base). Each scores ``--batch`` 1024 px images (the resize to the model's
size included), jitted; the figure is the median of 3 calls after the compiling one, divided by
the batch.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=1)
CLIPS = {  # (text width, layers, heads), (vision width, layers, heads, patch, mlp), projection
    "clip_vit_l14": ((768, 12, 12), (1024, 24, 16, 14, 4096), 768, "quick_gelu"),
    "clip_vit_h14": ((1024, 24, 16), (1280, 32, 16, 14, 5120), 1024, "gelu"),
    "clip_vit_g14": ((1024, 24, 16), (1408, 40, 16, 14, 6144), 1024, "gelu"),
}


def random_weights(module, seed):
  """Random float32 numpy weights for every tensor of ``module`` (built on the meta device)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, t in module.state_dict().items():
    if t.dtype.is_floating_point:
      std = 1.0 / np.sqrt(t.shape[-1]) if t.ndim >= 2 else 0.02
      out[name] = (rng.standard_normal(tuple(t.shape), np.float32) * std).astype(np.float32)
    else:
      out[name] = np.arange(t.shape[-1])[None].repeat(t.shape[0], 0) if t.ndim == 2 else \
          np.zeros(tuple(t.shape), np.int64)
  return out


def write_clip(path, spec):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from mcm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top
  (tw, tl, th), (vw, vl, vh, patch, mlp), proj, act = spec
  config = transformers.CLIPConfig(
      text_config=dict(TEXT, hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th,
                       intermediate_size=4 * tw, hidden_act=act),
      vision_config=dict(hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh,
                         patch_size=patch, image_size=224, intermediate_size=mlp, hidden_act=act),
      projection_dim=proj)
  with torch.device("meta"):
    model = transformers.CLIPModel(config)
  os.makedirs(path, exist_ok=True)
  weights = {k: v for k, v in random_weights(model, 0).items() if "position_ids" not in k}
  weights["logit_scale"] = np.asarray(np.log(100.0), np.float32)
  save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  config.save_pretrained(path)
  convert_open_clip.write_clip_tokenizer(path)


def write_imagereward(path):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.blip import modeling_blip, modeling_blip_text  # pylint: disable=g-import-not-at-top
  from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig  # pylint: disable=g-import-not-at-top
  import sdxl_fixtures  # pylint: disable=g-import-not-at-top
  med = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, vocab_size=30524, max_position_embeddings=512,
             layer_norm_eps=1e-12, encoder_width=1024, add_cross_attention=True)
  with torch.device("meta"):
    vision = modeling_blip.BlipVisionModel(BlipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, layer_norm_eps=1e-6))
    text = modeling_blip_text.BlipTextModel(BlipTextConfig(
        vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512),
        add_pooling_layer=False)
    head = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(),
                               torch.nn.Linear(1024, 128), torch.nn.Dropout(),
                               torch.nn.Linear(128, 64), torch.nn.Dropout(),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
  to_torch = lambda d: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}
  sd = sdxl_fixtures.imagereward_state_dict(to_torch(random_weights(vision, 1)),
                                            to_torch(random_weights(text, 2)),
                                            to_torch(random_weights(head, 3)))
  os.makedirs(path, exist_ok=True)
  torch.save(sd, os.path.join(path, "ImageReward.pt"))
  with open(os.path.join(path, "med_config.json"), "w") as f:
    json.dump(med, f)
  words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["red", "fox", "in", "the", "snow"]
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(words) + "\n")


def time_scorer(score, params, tokens, images, repeats=3):
  import jax  # pylint: disable=g-import-not-at-top
  fn = jax.jit(score)
  jax.block_until_ready(fn(params, images, tokens))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, images, tokens))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cache", default=os.path.expanduser("~/.cache/mcm_jax/scorers_random"))
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  from mcm_jax import scorers  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, 1024, 1024, 3)).astype(
      np.float32)
  prompts = ["a red fox in the snow"] * args.batch
  figures = {"machine": platform.machine(), "cpus": os.cpu_count(), "batch": args.batch,
             "image_px": 1024}
  for name, spec in CLIPS.items():
    path = os.path.join(args.cache, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
      write_clip(path, spec)
    model = scorers.load_clip(path)
    seconds = time_scorer(scorers.clip_score(model), model.params,
                          model.tokenize(prompts), images)
    figures[f"{name}_s_per_image"] = round(seconds / args.batch, 3)
    del model
    print(json.dumps(figures), file=sys.stderr, flush=True)  # so far, in case a phase dies
  path = os.path.join(args.cache, "imagereward")
  if not os.path.isfile(os.path.join(path, "ImageReward.pt")):
    write_imagereward(path)
  model = scorers.load_imagereward(path)
  seconds = time_scorer(model.score, model.params, model.tokenize(prompts), images)
  figures["imagereward_s_per_image"] = round(seconds / args.batch, 3)
  figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
