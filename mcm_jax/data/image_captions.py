"""Image + caption pairs from a local (or object-store) folder, for latent consistency
fine-tuning and the image-based MLCD baselines.

Two layouts, the two the field's fine-tuning tools read:
- Hugging Face ``imagefolder``: ``DIR/metadata.jsonl``, one ``{"file_name": ..., "text": ...}``
  per image (the caption field may also be ``caption`` or ``prompt``), file names relative to
  ``DIR``;
- kohya sd-scripts: a caption file beside each image, same stem, ``.txt`` or ``.caption``.

Images (``.png .jpg .jpeg .webp .bmp``) are read in file-name order, decoded with PIL, converted
to RGB, centre-cropped to a square and resized to the resolution (``images.center_crop_resize``):
``source[i] -> {'x': float32 [r, r, 3] in [-1, 1], 'label': caption}``, read in batches by
``mcm_jax.data.loader``.
"""
import io
import json
import os

import numpy as np

from mcm_jax import storage
from mcm_jax.data import images, loader
from mcm_jax.data.prompts import PROMPT_FIELDS
from mcm_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA = "metadata.jsonl"


def _metadata_pairs(directory):
  """[(file name, caption)] of ``DIR/metadata.jsonl``; errors name the file and line."""
  path = os.path.join(directory, METADATA)
  pairs = []
  for i, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{i}: not a JSON object ({e.msg})") from e
    field = next((k for k in PROMPT_FIELDS if isinstance(row, dict) and k in row), None)
    if not isinstance(row, dict) or "file_name" not in row or field is None:
      raise UserError(f"{path}:{i}: needs 'file_name' and one of {PROMPT_FIELDS}; got "
                      f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
    pairs.append((str(row["file_name"]), str(row[field]).strip()))
  return pairs


def _sidecar_pairs(directory, names):
  """[(image, caption)] from a caption file beside each image; the first image without one is
  an error."""
  stems = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(CAPTION_EXTENSIONS)}
  pairs = []
  for name in sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)):
    caption = stems.get(os.path.splitext(name)[0])
    if caption is None:
      raise UserError(f"image {os.path.join(directory, name)} has no caption: add "
                      f"{os.path.splitext(name)[0]}.txt beside it, or a {METADATA} "
                      "(file_name, text) for the folder")
    pairs.append((name, storage.read_text(os.path.join(directory, caption)).strip()))
  return pairs


def list_pairs(directory):
  """[(image file name, caption)] of the folder, sorted by file name."""
  if not directory or not storage.isdir(directory):
    raise FileNotFoundError(f"image folder {directory!r} is not a directory (images with "
                            f"captions: a {METADATA} or a .txt beside each image)")
  names = storage.listdir(directory)
  pairs = (_metadata_pairs(directory) if METADATA in names
           else _sidecar_pairs(directory, names))
  if not pairs:
    raise UserError(f"image folder {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  for name, caption in pairs:
    if not caption:
      raise UserError(f"image {os.path.join(directory, name)} has an empty caption")
  return sorted(pairs)


class ImageCaptionFolder:
  """The folder's pairs by random access: ``source[i]`` reads and decodes image ``i``."""

  def __init__(self, directory, resolution):
    self.directory, self.resolution = directory, resolution
    self.pairs = list_pairs(directory)
    self.captions = [c for _, c in self.pairs]

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    name, caption = self.pairs[int(i)]
    path = os.path.join(self.directory, name)
    try:  # one read per image, no separate existence check (a round trip in an object store)
      data = storage.read_bytes(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"image {path} named in {METADATA} does not exist") from e
    try:
      image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
      raise UserError(f"image {path} is not a readable image ({e})") from e
    return {"x": images.center_crop_resize(image, self.resolution), "label": caption}


def host_batch_fn(source, encode_batch, global_batch, seed, key="image", **reading):
  """``batch(step)``: this process's pairs of the step (``loader.host_batch_fn``, ``reading``
  its workers / threads), as ``encode_batch(captions)`` plus ``key``: the images
  (``ImageCaptionFolder``) or their latents (``latent_cache.LatentCache``)."""
  return loader.host_batch_fn(source, global_batch, seed, transform=lambda pairs: dict(
      encode_batch([str(c) for c in pairs["label"]]), **{key: pairs["x"]}), **reading)
