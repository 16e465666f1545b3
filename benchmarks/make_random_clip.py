"""A full-size CLIP ViT-L/14 with random weights, in the transformers layout of
openai/clip-vit-large-patch14 (text and vision towers, projections, CLIP's real BPE tokenizer from
the open_clip_torch wheel): what ``t2i_eval --clip`` reads, for timing the evaluation at full
size without downloading anything.

  python benchmarks/make_random_clip.py DIR [--seed=0]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_random_sdxl import CLIP_L  # pylint: disable=wrong-import-position
from mcm_jax import convert_open_clip, rewards  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  vision = {k: v for k, v in rewards.CLIP_VIT_L14.items() if k != "projection_dim"}
  text = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}
  model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
  model.save_pretrained(args.directory, safe_serialization=True)
  convert_open_clip.write_clip_tokenizer(args.directory)
  count = sum(p.numel() for p in model.parameters())
  print(json.dumps({"directory": args.directory, "parameters": count}))


if __name__ == "__main__":
  main()
