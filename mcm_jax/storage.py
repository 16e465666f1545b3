"""Files at local paths or object-store URLs (``gs://bucket/run``, ``s3://``): every file the
project reads or writes outside orbax's checkpoints goes through here, on ``etils.epath`` (the
path library orbax itself uses), so a TPU pod's hosts, which share no disk, can use
``--workdir=gs://...``.

``gs://`` needs ``gcsfs`` (or TensorFlow) for these files and ``google-cloud-storage`` for
orbax: ``pip install .[gcs]``. ``os.path.join`` is fine for building paths (on POSIX it joins
URLs correctly); what must not be used on them is ``open``, ``os.makedirs``, ``os.path.isdir``
and friends, which would quietly write a local directory named ``gs:``.

Object stores have no appends and no renames (an object is written whole, atomically):
``LineLog`` appends lines to local files but rewrites an object whole on ``flush``;
``replace_text`` writes a local file through a temporary file + rename, an object directly.

Object stores fail transiently (HTTP 408 / 429 / 5xx, timeouts, dropped connections): every
operation on a URL here is retried after ``RETRY_DELAYS_S`` (1 + 2 + 4 + 8 + 16 s), then the
last error is raised. Local files are not retried: their errors (a full disk, a missing file)
do not pass by themselves.
"""
import io
import json
import logging
import os
import shutil
import time

from etils import epath

from mcm_jax.errors import is_transient

RETRY_DELAYS_S = (1, 2, 4, 8, 16)


def _retried(path, operation):
  """``operation()``, retried after each delay of ``RETRY_DELAYS_S`` while ``path`` is a URL
  and the error is transient (``errors.is_transient``)."""
  if not is_url(path):
    return operation()
  for delay in RETRY_DELAYS_S:
    try:
      return operation()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if not is_transient(e):
        raise
      logging.warning("%s: %s: %s; retrying in %s s", path, type(e).__name__, e, delay)
      time.sleep(delay)
  return operation()


def is_url(path):
  """Whether ``path`` names an object in a store (``scheme://...``) rather than a local file."""
  return "://" in os.fspath(path)


def exists(path):
  return _retried(path, epath.Path(path).exists)


def isdir(path):
  return _retried(path, epath.Path(path).is_dir)


def isfile(path):
  p = epath.Path(path)
  return _retried(path, lambda: p.exists() and not p.is_dir())


def listdir(path):
  """Names in directory ``path`` (sorted)."""
  return _retried(path, lambda: sorted(p.name for p in epath.Path(path).iterdir()))


def makedirs(path):
  """Creates directory ``path`` and its parents if missing (object stores: nothing to do)."""
  _retried(path, lambda: epath.Path(path).mkdir(parents=True, exist_ok=True))


def dirname(path):
  return os.fspath(epath.Path(path).parent)


def read_bytes(path):
  return _retried(path, epath.Path(path).read_bytes)


def write_bytes(path, data):
  _retried(path, lambda: epath.Path(path).write_bytes(data))


def read_text(path):
  return _retried(path, epath.Path(path).read_text)


def write_text(path, text):
  _retried(path, lambda: epath.Path(path).write_text(text))


def read_range(path, offset, size):
  """``size`` bytes of ``path`` from byte ``offset`` (one ranged read in an object store), with
  retries."""
  def read():
    with epath.Path(path).open("rb") as f:
      f.seek(offset)
      return f.read(size)
  return _retried(path, read)


def reader(path):
  """A binary file object over the contents of ``path`` (read whole, with retries)."""
  return io.BytesIO(read_bytes(path))


def write_with(path, write):
  """Writes what ``write(file)`` writes into a binary file object to ``path`` (whole, with
  retries), e.g. ``write_with(path, lambda f: np.save(f, x))``."""
  buffer = io.BytesIO()
  write(buffer)
  write_bytes(path, buffer.getvalue())


def read_json(path):
  return json.loads(read_text(path))


def write_json(path, obj, indent=1):
  write_text(path, json.dumps(obj, indent=indent, default=str))


def replace_text(path, text):
  """Writes ``text`` to ``path`` so that a reader sees the old or the new contents, never a
  mix: local files through ``<path>.tmp``, fsync and rename; objects are written whole."""
  if is_url(path):
    write_text(path, text)
    return
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def local_copy(path, cache_dir):
  """A local path with the contents of ``path``: ``path`` itself if local, else a copy in
  ``cache_dir`` (for readers that need a local file, e.g. ``np.load(mmap_mode="r")``); an
  earlier copy of the same size is reused."""
  if not is_url(path):
    return os.fspath(path)
  source = epath.Path(path)
  target = os.path.join(cache_dir, *source.parts[1:])
  size = _retried(path, lambda: source.stat().length)
  if not (os.path.isfile(target) and os.path.getsize(target) == size):
    os.makedirs(os.path.dirname(target), exist_ok=True)

    def copy():
      with source.open("rb") as src, open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)

    _retried(path, copy)
    os.replace(target + ".part", target)
  return target


class LineLog:
  """A text file that grows by whole lines (``metrics.jsonl``).

  Local file: appended line-buffered (a killed process loses no finished line), ``flush``
  fsyncs. Object (no appends in object stores): lines are kept in memory and ``flush`` rewrites
  the object whole, so what a kill loses is the lines since the last flush (the train loop
  flushes before every checkpoint, and a resume drops later rows anyway).
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self._remote = is_url(self.path)
    self._lines = None
    self._file = None
    if self._remote:
      self._lines = self.read_lines() if exists(self.path) else []
    else:
      self._file = _append(self.path)

  def read_lines(self):
    """The file's lines as stored (newlines kept; a torn last line has none)."""
    if self._lines is not None:
      return list(self._lines)
    if not exists(self.path):
      return []
    return read_bytes(self.path).decode("utf-8", "replace").splitlines(True)

  def append(self, line):
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)

  def replace(self, lines):
    """Replaces the contents with ``lines`` atomically (``replace_text``)."""
    if self._remote:
      self._lines = list(lines)
      self.flush()
      return
    self._file.close()
    try:
      replace_text(self.path, "".join(lines))
    finally:
      self._file = _append(self.path)

  def flush(self):
    """Makes every line appended so far durable."""
    if self._remote:
      write_text(self.path, "".join(self._lines))
    else:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    if self._remote or not self._file.closed:
      self.flush()
    if not self._remote:
      self._file.close()


def _append(path):
  """A line-buffered local file opened for appending (the caller closes it)."""
  return open(path, "a", buffering=1, encoding="utf-8")  # pylint: disable=consider-using-with


def _fsync_dir(path):
  """Persists a rename inside ``path`` (POSIX; a no-op where directories cannot be opened)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
