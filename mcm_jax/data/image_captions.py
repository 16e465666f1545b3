"""Image + caption pairs from a local (or object-store) folder, webdataset shards or a tfds
dataset, for latent consistency fine-tuning and the image-based MLCD baselines
(``open_source``).

Folders, in the two layouts the field's fine-tuning tools read:
- Hugging Face ``imagefolder``: ``DIR/metadata.jsonl``, one ``{"file_name": ..., "text": ...}``
  per image (the caption field may also be ``caption`` or ``prompt``), file names relative to
  ``DIR``;
- kohya sd-scripts: a caption file beside each image, same stem, ``.txt`` or ``.caption``.
webdataset: ``DIR/*.tar`` (uncompressed, as img2dataset writes them), a sample being the members
that share a key (the path up to the base name's first dot): an image and a ``.txt`` /
``.caption`` caption, or a ``.json`` with one of the caption fields; the shards are indexed once
(each image's byte range) and read by random access. tfds: a prepared dataset (array_record)
with an ``image`` feature and a text caption feature (``caption_key``, '/'-separated into nested
features; the first of a sequence of captions, as COCO's five).

Images (``.png .jpg .jpeg .webp .bmp``) are read in name order, decoded with PIL, converted
to RGB, centre-cropped to a square and resized to the resolution (``images.center_crop_resize``):
``source[i] -> {'x': float32 [r, r, 3] in [-1, 1], 'label': caption}``, read in batches by
``mcm_jax.data.loader``. Every source has ``pairs`` ([(name, caption)], the names identifying
its images to the latent cache), ``captions``, ``directory`` and ``resolution``.
"""
import io
import json
import os
import tarfile

import numpy as np

from mcm_jax import storage
from mcm_jax.data import images, loader
from mcm_jax.data.prompts import PROMPT_FIELDS, prompt_field
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
    field = prompt_field(row) if isinstance(row, dict) else None
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


def decode_image(data, where, resolution):
  """Encoded image bytes -> float32 [r, r, 3] in [-1, 1], centre-cropped and resized; a
  UserError naming ``where`` when they are not an image."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f"image {where} is not a readable image ({e})") from e
  return images.center_crop_resize(image, resolution)


class ImageCaptionFolder:
  """The folder's pairs by random access: ``source[i]`` reads and decodes image ``i``."""

  def __init__(self, directory, resolution):
    self.directory, self.resolution = directory, resolution
    self.pairs = list_pairs(directory)
    self.captions = [c for _, c in self.pairs]

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    name, caption = self.pairs[int(i)]
    path = os.path.join(self.directory, name)
    try:  # one read per image, no separate existence check (a round trip in an object store)
      data = storage.read_bytes(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"image {path} named in {METADATA} does not exist") from e
    return {"x": decode_image(data, path, self.resolution), "label": caption}


SHARD_EXTENSION = ".tar"


def sample_key(member):
  """webdataset's (sample key, extension) of a tar member name: the path up to the first dot of
  its base name, and the rest lower-cased (``a/b.seg.jpg`` -> ``('a/b', 'seg.jpg')``)."""
  directory, base = os.path.split(member)
  stem, _, extension = base.partition(".")
  return os.path.join(directory, stem), extension.lower()


def _json_caption(data, where):
  try:
    row = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{where}: not a JSON object ({e})") from e
  field = prompt_field(row) if isinstance(row, dict) else None
  return None if field is None else str(row[field])


def index_shard(path):
  """[(key, byte offset of its image, its size, caption)] of a webdataset shard, in member
  order (headers and captions read once; the images are not read)."""
  samples = {}  # key -> its members' parts, in member order
  with storage.reader(path) if storage.is_url(path) else open(path, "rb") as f:
    try:
      tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
      raise UserError(f"webdataset shard {path} is not an uncompressed tar ({e}); allowed: "
                      ".tar shards (compressed ones cannot be read by random access)") from e
    for member in tar:
      if not member.isfile():
        continue
      key, extension = sample_key(member.name)
      sample = samples.setdefault(key, {})
      last = extension.rsplit(".", 1)[-1]
      if "." + last in IMAGE_EXTENSIONS:
        sample["image"] = (member.offset_data, member.size)
      elif "." + last in CAPTION_EXTENSIONS and "caption" not in sample:
        sample["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
      elif last == "json" and "caption" not in sample:
        caption = _json_caption(tar.extractfile(member).read(), f"{path}:{member.name}")
        if caption is not None:
          sample["caption"] = caption.strip()
  out = []
  for key, sample in samples.items():
    if "image" not in sample or not sample.get("caption"):
      raise UserError(f"webdataset shard {path}: sample {key!r} has "
                      + ("no image" if "image" not in sample else "no caption")
                      + f" (members {key}.<ext>: an image {IMAGE_EXTENSIONS}, a caption "
                        f"{CAPTION_EXTENSIONS} or .json with one of {PROMPT_FIELDS})")
    out.append((key,) + sample["image"] + (sample["caption"],))
  return out


class WebDatasetShards:
  """The samples of the webdataset shards ``directory/*.tar`` (in shard-name, then member
  order) by random access: ``source[i]`` reads sample ``i``'s image bytes at their offset in
  its shard."""

  def __init__(self, directory, resolution):
    self.directory, self.resolution = directory, resolution
    shards = sorted(n for n in storage.listdir(directory) if n.endswith(SHARD_EXTENSION))
    indexed = [(shard, sample) for shard in shards
               for sample in index_shard(os.path.join(directory, shard))]
    if not indexed:
      raise UserError(f"webdataset shards in {directory} hold no samples")
    self.samples = [(shard, offset, size) for shard, (_, offset, size, _) in indexed]
    self.pairs = [(f"{shard}/{key}", caption) for shard, (key, _, _, caption) in indexed]
    self.captions = [caption for _, caption in self.pairs]

  def __len__(self):
    return len(self.samples)

  def __getitem__(self, i):
    shard, offset, size = self.samples[int(i)]
    path = os.path.join(self.directory, shard)
    return {"x": decode_image(storage.read_range(path, offset, size), f"{self.pairs[int(i)][0]} "
                              f"(bytes {offset}+{size} of {path})", self.resolution),
            "label": self.captions[int(i)]}


class TfdsImageCaptions(images.TfdsSource):
  """A prepared tfds dataset's (image, caption) pairs by random access (``images.TfdsSource``,
  array_record): the ``image`` feature and the text feature ``caption_key`` ('/' into nested
  features, e.g. COCO's ``captions/text``; the first of a sequence). Every caption is read at
  construction (the images are not decoded)."""

  def __init__(self, name, data_dir, split, resolution, caption_key="caption"):
    self.caption_path = caption_key.split("/")
    super().__init__(name, data_dir, split, resolution, label_key=self.caption_path[0])
    self.directory = f"{data_dir} (tfds {name}, split {split})"
    self.captions = [self.label(self.source[i]) for i in range(len(self.source))]
    self.pairs = [(str(i), caption) for i, caption in enumerate(self.captions)]

  def label(self, record):
    """The record's caption (a str)."""
    value = record
    for part in self.caption_path:
      if not hasattr(value, "keys") or part not in value:
        raise UserError(f"tfds dataset {self.name!r} has no caption feature "
                        f"{'/'.join(self.caption_path)!r}; its features: {sorted(record)}")
      value = value[part]
    if np.ndim(value):
      if not len(value):
        raise UserError(f"tfds dataset {self.name!r}: a record has no caption in "
                        f"{'/'.join(self.caption_path)!r}")
      value = value[0]
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


def open_source(config, resolution):
  """The image + caption source of ``config.images``: the tfds dataset ``tfds`` (prepared in
  ``dir``), webdataset shards when ``dir`` holds ``.tar`` files, else a folder of images."""
  if config.get("tfds"):
    return TfdsImageCaptions(config.tfds, config.dir, config.get("split", "train"), resolution,
                             config.get("caption_key", "caption"))
  if (config.dir and storage.isdir(config.dir)
      and any(n.endswith(SHARD_EXTENSION) for n in storage.listdir(config.dir))):
    return WebDatasetShards(config.dir, resolution)
  return ImageCaptionFolder(config.dir, resolution)


def host_batch_fn(source, encode_batch, global_batch, seed, key="image", **reading):
  """``batch(step)``: this process's pairs of the step (``loader.host_batch_fn``, ``reading``
  its workers / threads), as ``encode_batch(captions)`` plus ``key``: the images
  (``ImageCaptionFolder``) or their latents (``latent_cache.LatentCache``)."""
  return loader.host_batch_fn(source, global_batch, seed, transform=lambda pairs: dict(
      encode_batch([str(c) for c in pairs["label"]]), **{key: pairs["x"]}), **reading)
