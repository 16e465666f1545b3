"""Image data as host batch functions ``batch(step) -> {'x': [b, H, W, C] in [-1, 1], 'label'}``.

Deterministic: the batch of a step depends only on (seed, step), so the data position is the
step and a resumed run reads exactly what an uninterrupted one would. Each process takes its
own slice of the global batch (``jax.process_index()``).

Datasets:
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (shipped inside the scikit-learn wheel,
  no download; scikit-learn is BSD-3, the data is the UCI "Optical Recognition of Handwritten
  Digits" set, CC BY 4.0), upsampled to the requested resolution, 1 channel, 10 classes.
- ``imagenet``: not wired yet (tracked in the pixel-MCM issue); asking for it fails clearly.
"""
import jax
import numpy as np

DATASETS = ("digits", "imagenet")


def load_digits(resolution=16):
  """(images [1797, r, r, 1] float32 in [-1, 1], labels [1797] int32); r a multiple of 8."""
  if resolution % 8:
    raise ValueError(f"data.resolution={resolution} is invalid for digits; allowed: multiples "
                     "of 8")
  try:
    from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the digits dataset needs scikit-learn: pip install -e '.[demo]'") from e
  data = sk_digits()
  images = data.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values 0..16
  k = resolution // 8
  images = np.repeat(np.repeat(images, k, axis=1), k, axis=2)[..., None]
  return images, data.target.astype(np.int32)


def load(name, resolution, data_dir=None):
  if name == "digits":
    return load_digits(resolution)
  if name == "imagenet":
    raise NotImplementedError(
        f"data.name='imagenet' (data_dir={data_dir!r}) is not wired yet: the tfds ImageNet "
        "pipeline is still open in the pixel-MCM issue; use data.name='digits' meanwhile")
  raise ValueError(f"data.name={name!r} is not known; allowed: {DATASETS}")


def host_batch_fn(images, labels, global_batch, seed):
  """``batch(step)``: this process's slice of the step's global batch, sampled without
  replacement within an epoch (a fresh permutation per epoch from (seed, epoch))."""
  n = len(images)
  procs, index = jax.process_count(), jax.process_index()
  if global_batch % procs:
    raise ValueError(f"batch_size={global_batch} is not divisible by the {procs} processes")
  local = global_batch // procs

  def batch(step):
    flat = step * global_batch + np.arange(global_batch)
    epochs, pos = flat // n, flat % n
    idx = np.empty(global_batch, np.int64)
    for e in np.unique(epochs):  # a batch may straddle an epoch boundary
      perm = np.random.default_rng([seed, int(e)]).permutation(n)
      idx[epochs == e] = perm[pos[epochs == e]]
    mine = idx[index * local:(index + 1) * local]
    return {"x": images[mine], "label": labels[mine]}

  return batch
