"""Prompts from a local file, and a host batch function over them.

Formats: ``.txt`` (one prompt per line), ``.jsonl`` (a ``"prompt"`` / ``"caption"`` / ``"text"``
field per line), ``.parquet`` (a column of that name; needs pyarrow). Empty prompts
are dropped. Batches are a deterministic function of (seed, step) -- an epoch permutation as
for images -- so the data position is the step stored with every checkpoint.
"""
import json
import os

from mcm_jax.data.images import local_indices_fn

PROMPT_FIELDS = ("prompt", "caption", "text")


def load_prompts(path):
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path!r} not found (.txt, .jsonl or .parquet)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    with open(path, encoding="utf-8") as f:
      prompts = [line.strip() for line in f]
  elif ext == ".jsonl":
    prompts = []
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        row = json.loads(line)
        field = next((k for k in PROMPT_FIELDS if k in row), None)
        if field is None:
          raise ValueError(f"{path}:{i + 1}: no field of {PROMPT_FIELDS} in {sorted(row)}")
        prompts.append(str(row[field]).strip())
  elif ext == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(path)
    field = next((k for k in PROMPT_FIELDS if k in table.column_names), None)
    if field is None:
      raise ValueError(f"{path}: no column of {PROMPT_FIELDS} in {table.column_names}")
    prompts = [str(p).strip() for p in table.column(field).to_pylist()]
  else:
    raise ValueError(f"prompt file {path!r}: extension {ext!r} is not one of .txt, .jsonl, "
                     ".parquet")
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"prompt file {path!r} holds no prompts")
  return prompts


def host_batch_fn(prompts, encode, global_batch, seed):
  """``batch(step) -> encode(this process's prompts of the step)``."""
  indices = local_indices_fn(global_batch, len(prompts), seed)
  return lambda step: encode([prompts[i] for i in indices(step)])


def builtin_prompts():
  """20 short prompts for the tiny configuration (hashed-text stand-in, no prompt file)."""
  return [f"a photo of {w} {v}" for w in ("red", "green", "blue", "small", "large")
          for v in ("cat", "dog", "house", "tree")]
