"""Image data as host batch functions ``batch(step) -> {'x': [b, H, W, C] in [-1, 1], 'label'}``.

Deterministic: the batch of a step depends only on (seed, step) -- a fresh permutation of the
dataset per epoch from (seed, epoch) -- so the data position *is* the step that every checkpoint
stores, and a resumed run reads exactly what an uninterrupted one would. Each process reads only
its own slice of the global batch (``jax.process_index()``).

Sources (``load(name, ...)``), each ``len(source)`` and ``source.get(indices) -> (x, labels)``:
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (shipped inside the scikit-learn wheel,
  no download; scikit-learn is BSD-3, the data is the UCI "Optical Recognition of Handwritten
  Digits" set, CC BY 4.0), upsampled (nearest) to the requested resolution, 1 channel.
- any other name: a tensorflow-datasets dataset read by random access (``tfds.data_source``,
  array_record files; no TensorFlow needed) from a local ``data_dir`` -- nothing downloads.
  E.g. ``imagenet2012`` (prepare once with ``tfds build imagenet2012 --manual_dir=...
  --file_format=array_record``) or ``imagenet_resized/64x64``. Images are decoded with PIL in a
  thread pool, centre-cropped to a square and resized (PIL bicubic, antialiased) to the
  resolution.
"""
import concurrent.futures
import io

import jax
import numpy as np

from mcm_jax import storage
from mcm_jax.errors import MissingExtraError, UserError

DIGITS = "digits"


def load_digits(resolution=16):
  """(images [1797, r, r, 1] float32 in [-1, 1], labels [1797] int32); r a multiple of 8."""
  if resolution % 8:
    raise UserError(f"data.resolution={resolution} is invalid for digits; allowed: multiples "
                    "of 8")
  try:
    from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingExtraError(
        "the digits dataset needs scikit-learn: pip install -e '.[demo]'") from e
  data = sk_digits()
  images = data.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values 0..16
  k = resolution // 8
  images = np.repeat(np.repeat(images, k, axis=1), k, axis=2)[..., None]
  return images, data.target.astype(np.int32)


class ArraySource:
  """In-memory images [N, H, W, C] in [-1, 1] and labels [N]."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def get(self, indices):
    return self.images[indices], self.labels[indices]


def center_crop_resize(image, resolution):
  """uint8 [H, W, C] -> float32 [r, r, C] in [-1, 1]: central square crop, bicubic resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  square = image[top:top + s, left:left + s]
  if s != resolution:
    pil = Image.fromarray(square.squeeze(-1) if square.shape[-1] == 1 else square)
    square = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC))
    square = square.reshape(resolution, resolution, -1)
  return square.astype(np.float32) / 127.5 - 1.0


class TfdsSource:
  """A tfds dataset split by random access; ``get`` decodes and resizes in a thread pool."""

  def __init__(self, name, data_dir, split, resolution, image_key="image", label_key="label",
               num_threads=16):
    if not data_dir or not storage.isdir(data_dir):
      raise FileNotFoundError(f"config.data.data_dir={data_dir!r} is not a directory; "
                              f"data.name={name!r} reads a prepared tfds dataset from a "
                              "directory, local or gs:// (nothing is downloaded)")
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise MissingExtraError(f"data.name={name!r} needs tensorflow-datasets: "
                              "pip install -e '.[imagenet]'") from e
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(f"tfds dataset {name!r} is not known to tfds and not prepared in "
                              f"data_dir={data_dir!r}") from e
    except (FileNotFoundError, AssertionError) as e:
      raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r}: "
                              f"{e}") from e
    except NotImplementedError as e:
      raise UserError(f"tfds dataset {name!r} in {data_dir!r} is not in a random-access "
                      "format; prepare it with --file_format=array_record (or convert: "
                      f"`tfds convert_format`): {e}") from e
    self.name, self.resolution = name, resolution
    self.image_key, self.label_key = image_key, label_key
    self.pool = concurrent.futures.ThreadPoolExecutor(num_threads)

  def __len__(self):
    return len(self.source)

  def _decode(self, record):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(Image.open(io.BytesIO(record[self.image_key])).convert("RGB"))
    return center_crop_resize(image, self.resolution), record[self.label_key]

  def get(self, indices):
    records = self.source.__getitems__([int(i) for i in indices])
    decoded = list(self.pool.map(self._decode, records))
    return (np.stack([d[0] for d in decoded]),
            np.asarray([d[1] for d in decoded], np.int32))


def load(name, resolution, data_dir="", split="train"):
  """The source for ``config.data``: digits, or a tfds dataset from a local directory."""
  if name == DIGITS:
    return ArraySource(*load_digits(resolution))
  return TfdsSource(name, data_dir, split, resolution)


def epoch_indices(step, global_batch, n, seed):
  """Dataset indices of a step's global batch: without replacement within an epoch (a fresh
  permutation per epoch from (seed, epoch); ``seed`` an int or ``seeds.entropy(seed, name)``); a
  batch may straddle two epochs."""
  flat = step * global_batch + np.arange(global_batch)
  epochs, pos = flat // n, flat % n
  idx = np.empty(global_batch, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([*np.ravel(seed).tolist(), int(e)]).permutation(n)
    idx[epochs == e] = perm[pos[epochs == e]]
  return idx


def process_rows(global_batch):
  """(start, stop): this process's rows of a global batch split evenly over the processes."""
  procs, index = jax.process_count(), jax.process_index()
  if global_batch % procs:
    raise UserError(f"batch_size={global_batch} is not divisible by the {procs} processes")
  local = global_batch // procs
  return index * local, (index + 1) * local


def local_indices_fn(global_batch, n, seed):
  """``indices(step)``: this process's part of ``epoch_indices(step, global_batch, n, seed)``."""
  lo, hi = process_rows(global_batch)
  return lambda step: epoch_indices(step, global_batch, n, seed)[lo:hi]


def subset_indices(n_source, n, entropy):
  """Sorted indices of ``n`` of ``n_source`` examples: a random subset from ``entropy`` (an int
  or ``seeds.entropy(seed, name)``), the same on every host."""
  return np.sort(np.random.default_rng(entropy).permutation(n_source)[:n])


def host_batch_fn(source, global_batch, seed, prefetch=2):
  """``batch(step)``: this process's slice of the step's global batch. ``prefetch`` > 0 reads the
  next steps' batches in a background thread (results are the same: a batch is a function of
  its step)."""
  indices = local_indices_fn(global_batch, len(source), seed)

  def read(step):
    x, label = source.get(indices(step))
    return {"x": x, "label": label}

  if not prefetch:
    return read
  pool = concurrent.futures.ThreadPoolExecutor(1)
  pending = {}

  def batch(step):
    future = pending.pop(step, None) or pool.submit(read, step)
    for stale in [s for s in pending if s < step]:
      pending.pop(stale).cancel()
    for ahead in range(step + 1, step + 1 + prefetch):
      if ahead not in pending:
        pending[ahead] = pool.submit(read, ahead)
    return future.result()

  return batch
