"""Prompts from a local file, and a host batch function over them.

Formats: ``.txt`` (one prompt per line), ``.jsonl`` (a ``"prompt"`` / ``"caption"`` / ``"text"``
field per line), ``.parquet`` (a column of that name; needs pyarrow). Empty prompts
are dropped. Batches are a deterministic function of (seed, step) -- an epoch permutation as
for images -- so the data position is the step stored with every checkpoint.
"""
import json
import os

from mcm_jax.data.loader import local_indices_fn
from mcm_jax import storage
from mcm_jax.errors import UserError

PROMPT_FIELDS = ("prompt", "caption", "text")


def prompt_field(names):
  """The first of ``PROMPT_FIELDS`` among ``names`` (a row's keys, a table's columns), or None."""
  return next((k for k in PROMPT_FIELDS if k in names), None)


def load_prompts(path):
  """The non-empty prompts of a file (local or an object-store URL); errors name the file (and
  the 1-based line)."""
  if not path or not storage.isfile(path):
    raise FileNotFoundError(f"prompt file {path!r} not found (.txt, .jsonl or .parquet)")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".jsonl", ".parquet"):
    raise UserError(f"prompt file {path!r}: extension {ext!r} is not one of .txt, .jsonl, "
                    ".parquet")
  if ext == ".parquet":
    prompts = _parquet_prompts(path)
  else:
    prompts = []
    with storage.reader(path) as f:
      for i, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise UserError(f"{path}:{i}: not UTF-8 text ({e.reason} at column {e.start + 1}); "
                          "allowed: UTF-8 files") from e
        prompts.append(line.strip() if ext == ".txt" else _jsonl_prompt(line, f"{path}:{i}"))
  prompts = [p for p in prompts if p]
  if not prompts:
    raise UserError(f"prompt file {path!r} holds no prompts")
  return prompts


def coco_captions(path, num=5000, seed=0):
  """``num`` captions of COCO's ``captions_*.json`` (a local or object-store path): ``num``
  images picked with ``seed``, then one of each image's captions picked with it (the
  MSCOCO-2017 5k prompts MLCM / LCM evaluate on), in image-id order."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not path or not storage.isfile(path):
    raise FileNotFoundError(f"COCO captions file {path!r} not found (captions_val2017.json)")
  try:
    annotations = json.loads(storage.read_text(path))["annotations"]
    by_image = {}
    for a in annotations:
      by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not a COCO captions file (an 'annotations' list of "
                    f"{{'image_id', 'caption'}}; {type(e).__name__}: {e})") from e
  images = sorted(by_image)
  if num > len(images):
    raise UserError(f"num_prompts={num} is more than the {len(images)} images of {path}")
  rng = np.random.default_rng(seed)
  chosen = np.sort(rng.permutation(len(images))[:num])
  return [by_image[images[i]][rng.integers(len(by_image[images[i]]))] for i in chosen]


def _jsonl_prompt(line, where):
  """The prompt of one .jsonl line ('' for a blank line); ``where`` is 'file:line'."""
  if not line.strip():
    return ""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not a JSON object ({e.msg} at column {e.colno}): "
                    f"{line.strip()[:80]!r}") from e
  if not isinstance(row, dict):
    raise UserError(f"{where}: a JSON {type(row).__name__}, not an object with one of "
                    f"{PROMPT_FIELDS}")
  field = prompt_field(row)
  if field is None:
    raise UserError(f"{where}: no field of {PROMPT_FIELDS} in {sorted(row)}")
  return str(row[field]).strip()


def _parquet_prompts(path):
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    table = pq.read_table(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise UserError(f"{path} is not a readable parquet file ({e})") from e
  field = prompt_field(table.column_names)
  if field is None:
    raise UserError(f"{path}: no column of {PROMPT_FIELDS} in {table.column_names}")
  return [str(p).strip() for p in table.column(field).to_pylist()]


def host_batch_fn(prompts, encode, global_batch, seed):
  """``batch(step) -> encode(this process's prompts of the step)``."""
  indices = local_indices_fn(global_batch, len(prompts), seed)
  return lambda step: encode([prompts[i] for i in indices(step)])


def builtin_prompts():
  """20 short prompts for the tiny configuration (hashed-text stand-in, no prompt file)."""
  return [f"a photo of {w} {v}" for w in ("red", "green", "blue", "small", "large")
          for v in ("cat", "dog", "house", "tree")]
