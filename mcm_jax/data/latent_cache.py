"""The VAE latents of an image folder, encoded once and read by random access.

Stored in the trajectory bank's layout (``trajectory_bank.write``: ``meta_p*.json`` and per-shard
``.npy`` files, written by every process for its own rows, local or ``gs://``) with the fields
``index`` (the image's position in the folder's sorted list) and ``latents`` [h, w, 4] float32.
The folder is encoded in order, a global batch at a time (the last batch wraps around), by a
jitted, batch-sharded encoder; a cache whose settings (VAE, folder, resolution, the images'
names) differ from the run's is refused.
"""
import hashlib

import numpy as np

from mcm_jax import sharding
from mcm_jax.data import loader, trajectory_bank
from mcm_jax.data.loader import process_rows
from mcm_jax.errors import UserError

FIELDS = ("index", "latents")
WHAT = "latent cache"


def settings(source, vae):
  """What the cached latents depend on: the VAE, the folder, the resolution and its images."""
  names = "\n".join(name for name, _ in source.pairs).encode()
  return dict(vae=vae, images=source.directory, resolution=source.resolution,
              num_images=len(source), names_sha1=hashlib.sha1(names).hexdigest())


class LatentCache:
  """``cache[i] -> {'x': latents [h, w, 4], 'label': caption}``: the cached latents of
  ``source``'s pairs (an ``ImageCaptionFolder``), ``len`` its number of images."""

  def __init__(self, bank, source):
    self.bank, self.captions = bank, source.captions
    index = np.concatenate([np.asarray(s["index"]) for s in bank.shards])
    self.row = np.full(len(source), -1, np.int64)
    self.row[index[::-1]] = np.arange(len(index))[::-1]  # an image's first row
    if (self.row < 0).any():
      raise UserError(f"{WHAT} lacks {int((self.row < 0).sum())} of the {len(source)} images of "
                      f"{source.directory}; delete it and run again")

  def __len__(self):
    return len(self.row)

  def __getitem__(self, i):
    return {"x": self.bank.get(self.row[[int(i)]])["latents"][0], "label": self.captions[int(i)]}


def open_or_build(directory, source, encode, vae, global_batch, mesh):
  """The ``LatentCache`` in ``directory``: reused if its settings match, else written first;
  ``encode(images) -> latents`` is jitted and runs on the batch sharded over ``mesh``."""
  n, (lo, hi) = len(source), process_rows(global_batch)

  def batches():
    for i in range(-(-n // global_batch)):
      index = ((i * global_batch + np.arange(global_batch)) % n)[lo:hi]
      images = sharding.shard_batch({"image": loader.read(source, index)["x"]}, mesh)["image"]
      yield {"index": index.astype(np.int32), "latents": encode(images)}

  bank = trajectory_bank.open_or_build(directory, settings(source, vae), batches, FIELDS, WHAT)
  return LatentCache(bank, source)
