"""A trajectory bank: MLCM training pairs precomputed once by the (guided, sharded) teacher and
streamed during training, so a training step pays for no teacher call.

Each entry: ``prompt_index``, ``segment``, ``t_m``, ``t_n``, ``seg_start`` (int32) and the
latents ``z_tm``, ``z_tn`` (float32 [h, w, 4]). Layout: ``DIR/meta.json`` (settings + shard
list) and ``DIR/<shard>/<field>.npy`` per shard; every process writes the shards of its own
batch slices, and readers memory-map them, so entries are read by random access (the batch of
a step is a function of (seed, step), as everywhere else). A bank in an object store
(``gs://...``) is read from a local copy of its shards (``cache_dir``, made on first use).
"""
import logging
import os


import jax
import numpy as np
from jax.experimental import multihost_utils

from mcm_jax import storage
from mcm_jax.config_diff import differing_fields
from mcm_jax.data.loader import local_indices_fn
from mcm_jax.errors import UserError

FIELDS = ("prompt_index", "segment", "t_m", "t_n", "seg_start", "z_tm", "z_tn")


def _local_rows(x):
  """This process's rows of a batch-sharded global array, in order (host numpy); a numpy array
  is this process's rows already."""
  if jax.process_count() == 1 or isinstance(x, np.ndarray):
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def write(directory, settings, batches, fields=FIELDS):
  """Writes the bank from ``batches``: an iterable of dicts with ``fields`` (global, possibly
  sharded arrays, each process keeping its own rows; or this process's rows as numpy).
  ``settings`` (JSON) describe what made it (teacher, K, k, w, ...) and are checked by readers.
  Returns the number of local entries."""
  storage.makedirs(directory)
  shards, total = [], 0
  for i, batch in enumerate(batches):
    name = f"shard_p{jax.process_index():04d}_{i:06d}"
    storage.makedirs(os.path.join(directory, name))
    rows = {k: _local_rows(batch[k]) for k in fields}
    for k, v in rows.items():
      storage.write_with(os.path.join(directory, name, f"{k}.npy"),
                         lambda f, v=v: np.save(f, v))
    shards.append({"name": name, "size": int(len(rows[fields[0]]))})
    total += shards[-1]["size"]
  storage.write_json(os.path.join(directory, f"meta_p{jax.process_index():04d}.json"),
                     {"settings": settings, "shards": shards})
  return total


class Bank:
  """Random access over all processes' shards: ``len(bank)``, ``bank.get(indices) -> dict``."""

  def __init__(self, directory, settings=None, cache_dir=None, fields=FIELDS,
               what="trajectory bank"):
    metas = _metas(directory)
    if not metas:
      hint = ("build it first: config.mlcm.bank.dir with config.mlcm.bank.entries"
              if what == "trajectory bank" else "a training run writes it before reading it")
      raise FileNotFoundError(f"{what} {directory!r} has no meta_p*.json ({hint})")
    self.fields = fields
    self.shards, offsets = [], [0]
    for m in metas:
      meta = storage.read_json(os.path.join(directory, m))
      if settings is not None and meta["settings"] != settings:
        raise UserError(f"{what} {directory} was made with other settings: "
                        f"(bank, now) = {differing_fields(meta['settings'], settings)}; use "
                        "another bank directory")
      for shard in meta["shards"]:
        arrays = {k: np.load(storage.local_copy(os.path.join(directory, shard["name"], f"{k}.npy"),
                                                cache_dir or _default_cache()),
                             mmap_mode="r") for k in fields}
        self.shards.append(arrays)
        offsets.append(offsets[-1] + shard["size"])
    self.offsets = np.asarray(offsets)

  def __len__(self):
    return int(self.offsets[-1])

  def get(self, indices):
    indices = np.asarray(indices)
    shard = np.searchsorted(self.offsets, indices, side="right") - 1
    rows = [{k: np.asarray(self.shards[s][k][i - self.offsets[s]]) for k in self.fields}
            for s, i in zip(shard, indices)]
    return {k: np.stack([r[k] for r in rows]) for k in self.fields}


def _metas(directory):
  return [p for p in storage.listdir(directory) if p.startswith("meta_p")] if storage.isdir(
      directory) else []


def _default_cache():
  """Where a remote bank's shards are copied: ``$MCM_JAX_BANK_CACHE``, default
  ``~/.cache/mcm_jax/trajectory_bank`` (then ``<scheme>/<bucket>/<path>``)."""
  return os.environ.get("MCM_JAX_BANK_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mcm_jax", "trajectory_bank")


def open_or_build(directory, settings, batches, fields=FIELDS, what="trajectory bank"):
  """The bank in ``directory``: reused if it exists (its settings must equal ``settings``), else
  written from ``batches()`` (see ``write``) by every process, then read back. With several
  processes, process 0's look decides for all, taken before any process writes: a process that
  looked after another had written its part would read a partial bank and skip the build.
  ``fields`` and ``what`` (its name in messages) let other precomputed data use the same
  layout."""
  exists = bool(_metas(directory))
  if jax.process_count() > 1:
    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if exists:
    return Bank(directory, settings, fields=fields, what=what)
  n = write(directory, settings, batches(), fields)
  if jax.process_count() > 1:  # every host's shards are on the shared filesystem before reading
    multihost_utils.sync_global_devices(f"{what} written")
  logging.info("%s: %d entries on this process -> %s", what, n, directory)
  return Bank(directory, settings, fields=fields, what=what)


def batch_fn(bank, prompts, encode_batch, global_batch, seed):
  """``batch(step)``: bank entries of the step (epoch permutation) + their prompts' encoding."""
  indices = local_indices_fn(global_batch, len(bank), seed)

  def batch(step):
    entries = bank.get(indices(step))
    out = encode_batch([prompts[i] for i in entries["prompt_index"]])
    out.update({k: entries[k] for k in ("z_tm", "z_tn", "t_m", "t_n", "seg_start")})
    return out

  return batch
