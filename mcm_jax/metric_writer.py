"""Metric writers: clu's (TensorBoard + console) when TensorFlow is installed, else a
console + JSON-lines writer with the same methods (``pip install .[tensorboard]`` for TB)."""
import json
import logging
import os

import numpy as np

from mcm_jax import storage


class JsonlWriter:
  """Writes scalars to ``DIR/metrics.jsonl`` (the train loop logs progress to the console);
  images as PNG files in ``DIR``.

  One JSON object a line, ``{"step": N, "<run>/<metric>": value, ...}``; several runs may share
  the file (the toy's teacher and students). Durable: a local file is line-buffered (a killed
  process loses no finished line) and ``flush`` fsyncs; an object-store file is written whole
  by ``flush`` (the train loop flushes before every checkpoint and on every stop).
  ``drop_rows_after`` lets a resumed run drop the rows it wrote after its checkpoint, so the
  file holds one row per logged step.
  """

  def __init__(self, logdir):
    self.logdir = logdir
    storage.makedirs(logdir)
    self.path = os.path.join(logdir, "metrics.jsonl")
    self._log = storage.LineLog(self.path)
    lines = self._log.read_lines()
    if lines and not lines[-1].endswith("\n"):  # a process killed mid-line: appending would
      self._rewrite(lambda row: True)          # glue the next row to it

  def _rewrite(self, keep):
    """Rewrites the file with the rows for which ``keep(row)`` holds, atomically
    (``storage.LineLog.replace``); lines that are not JSON (torn by a kill) are dropped too."""
    lines = self._log.read_lines()
    kept, torn = [], 0
    for line in lines:
      try:
        row = json.loads(line) if line.endswith("\n") else None
      except ValueError:
        row = None
      if not isinstance(row, dict):
        torn += 1
      elif keep(row):
        kept.append(line)
    if len(kept) == len(lines):
      return 0
    if torn:
      logging.warning("%s: dropped %d torn line(s) left by a killed process", self.path, torn)
    self._log.replace(kept)
    return len(lines) - len(kept)

  def drop_rows_after(self, run, step):
    """Drops the rows of run ``run`` (keys ``run/...``) logged after ``step``: on resume from
    checkpoint ``step`` they are the rows a killed run wrote after it (the resumed run writes
    them again); on a fresh start (``step`` 0) every earlier row of ``run``. Other runs' rows
    stay. Returns how many lines were dropped."""
    prefix = f"{run}/"
    dropped = self._rewrite(lambda row: not (int(row.get("step", 0)) > step and any(
        k.startswith(prefix) for k in row)))
    if dropped:
      logging.info("%s: dropped %d row(s) of '%s' after step %d", self.path, dropped, run, step)
    return dropped

  def write_scalars(self, step, scalars):
    scalars = {k: float(v) for k, v in scalars.items()}
    self._log.append(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_images(self, step, images):
    from mcm_jax import plotting  # pylint: disable=g-import-not-at-top
    for name, img in images.items():
      img = np.asarray(img)
      img = img[0] if img.ndim == 4 else img
      plotting.write_png(os.path.join(self.logdir, f"{name}_{int(step)}.png"),
                         np.clip(img * 255 if img.dtype.kind == "f" else img, 0, 255)
                         .astype(np.uint8))

  def write_hparams(self, hparams):
    storage.write_json(os.path.join(self.logdir, "hparams.json"), hparams)

  def flush(self):
    """Makes every row written so far durable (``storage.LineLog.flush``)."""
    self._log.flush()

  def close(self):
    self._log.close()


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
