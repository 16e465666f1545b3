"""Metric writers: clu's (TensorBoard + console) when TensorFlow is installed, else a
console + JSON-lines writer with the same methods (``pip install .[tensorboard]`` for TB)."""
import json
import os

import numpy as np


class JsonlWriter:
  """Writes scalars to ``DIR/metrics.jsonl`` (the train loop logs progress to the console);
  images as PNG files in ``DIR``."""

  def __init__(self, logdir):
    self.logdir = logdir
    os.makedirs(logdir, exist_ok=True)
    self._file = open(os.path.join(logdir, "metrics.jsonl"), "a")

  def write_scalars(self, step, scalars):
    scalars = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_images(self, step, images):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for name, img in images.items():
      img = np.asarray(img)
      img = img[0] if img.ndim == 4 else img
      Image.fromarray(np.clip(img * 255 if img.dtype.kind == "f" else img, 0, 255)
                      .astype(np.uint8).squeeze()).save(
                          os.path.join(self.logdir, f"{name}_{int(step)}.png"))

  def write_hparams(self, hparams):
    with open(os.path.join(self.logdir, "hparams.json"), "w") as f:
      json.dump(hparams, f, indent=1, default=str)

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class NullWriter:
  """What processes other than 0 write: nothing."""

  def write_scalars(self, step, scalars):
    pass

  write_images = write_scalars

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  close = flush


def create_writer(logdir):
  """clu's default writer (TensorBoard + logging) if importable, else ``JsonlWriter``; on
  processes other than 0 a writer that drops everything."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return NullWriter()
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:  # clu's writers import tensorflow.
    return JsonlWriter(logdir)
  return metric_writers.create_default_writer(logdir)
