"""A full-size ImageReward v1.0 with random weights, in the layout ``rewards.imagereward_dir`` and
``t2i_eval --imagereward`` read (``ImageReward.pt``: BLIP ViT-L/16 + BERT-base with
cross-attention + the MLP head; ``med_config.json``; a small ``vocab.txt``): for the full-size
rehearsal's reward stage without downloading anything.

  python benchmarks/make_random_imagereward.py DIR
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scorers import write_imagereward  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("directory")
  write_imagereward(parser.parse_args().directory)


if __name__ == "__main__":
  main()
