"""Writes a folder of captioned images for the image paths' rehearsals and benchmarks:

  python benchmarks/write_image_folder.py DIR N WIDTH HEIGHT

N PNGs of smooth random colour fields (WIDTH x HEIGHT) with a kohya-style caption file each
(``mcm_jax.data.image_captions``'s layouts). Existing files are kept.
"""
import os
import sys

import numpy as np
from PIL import Image

CAPTIONS = ("a red fox in the snow", "a lighthouse at dusk, oil painting",
            "a bowl of ramen, studio photo", "an astronaut riding a horse")


def main(directory, n, width, height):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  for i in range(n):
    path = os.path.join(directory, f"{i:04d}.png")
    if not os.path.exists(path):
      waves = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)
                      + rng.uniform(0, 6)) for _ in range(3)]
      pixels = (127.5 * (1 + np.stack(waves, -1))).astype(np.uint8)
      Image.fromarray(pixels).save(path)
    with open(os.path.join(directory, f"{i:04d}.txt"), "w", encoding="utf-8") as f:
      f.write(CAPTIONS[i % len(CAPTIONS)] + "\n")


if __name__ == "__main__":
  if len(sys.argv) != 5:
    sys.exit(__doc__)
  main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
