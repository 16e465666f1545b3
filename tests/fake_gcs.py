"""A stand-in for Google Cloud Storage that needs no network: ``gs://bucket/key`` maps to
``<root>/bucket/key`` on local disk, behind the same interfaces the real bucket is reached by.

- fsspec's ``gs`` / ``gcs`` protocols (what ``etils.epath`` uses for ``gs://`` without
  TensorFlow, hence what ``mcm_jax.storage`` and orbax's metadata files use) are replaced by
  ``FakeGCS``, which, like GCS, has no appends.
- orbax reaches the bucket twice outside epath: tensorstore's ``gcs`` kvstore for array data
  (mapped to tensorstore's ``file`` driver on the same directory) and the storage client's bucket
  lookup (a bucket without hierarchical namespace).

A code path that used ``open`` / ``os.makedirs`` on a ``gs://`` URL would instead write under
``./gs:`` in the working directory, which the tests check stays absent.

``fail(operation, path_part, ...)`` makes chosen calls fail as GCS does on a bad day (an HTTP 503,
a timeout, a reset connection).

``python tests/fake_gcs.py ROOT -- <mcm_jax.main flags>`` runs the command-line program with the
fake installed (for subprocess tests)."""
import os
import sys

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class HttpError(Exception):
  """gcsfs' ``HttpError``: a failed request's message and HTTP status (``code``)."""

  def __init__(self, code, message):
    super().__init__(message)
    self.code = code


FAULTS = []  # [operation, path part, calls to let through, calls to fail, exception]


def fail(operation, path_part, times=1, error=None, after=0):
  """After ``after`` matching calls, the next ``times`` calls of ``operation`` ('read', 'write'
  or 'list') on a path containing ``path_part`` raise ``error`` (default: HTTP 503)."""
  FAULTS.append([operation, path_part, after, times,
                 error or HttpError(503, "Service Unavailable")])


def _inject(operation, path):
  for fault in FAULTS:
    if fault[0] == operation and fault[1] in str(path):
      if fault[2]:
        fault[2] -= 1
      elif fault[3]:
        fault[3] -= 1
        raise fault[4]


def install(root, monkeypatch=None):
  """Routes ``gs://`` to ``root`` for this process (fsspec, epath's cache, orbax); with pytest's
  ``monkeypatch`` the changes are undone after the test."""
  set_attr = monkeypatch.setattr if monkeypatch else setattr
  set_item = monkeypatch.setitem if monkeypatch else (lambda d, k, v: d.__setitem__(k, v))
  FAULTS.clear()
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)

  class FakeGCS(DirFileSystem):
    """``gs://bucket/key`` -> ``root/bucket/key``; append modes refused, as by gcsfs."""
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del args, finalize_on_close, kwargs
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://", "gs:/"):
        if path.startswith(prefix):
          path = path[len(prefix):]
          break
      return path.strip("/")

    def open(self, path, mode="rb", *args, **kwargs):  # pylint: disable=arguments-differ
      if "a" in mode or "+" in mode:
        raise NotImplementedError(f"object stores have no mode {mode!r} (path {path})")
      _inject("write" if "w" in mode or "x" in mode else "read", path)
      return super().open(path, mode, *args, **kwargs)

    def ls(self, path, *args, **kwargs):
      _inject("list", path)
      return super().ls(path, *args, **kwargs)

  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  for name in ("gs", "gcs"):
    set_item(registry, name, FakeGCS)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, bucket, key)}

  set_attr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  set_attr(gcs_utils, "get_bucket", lambda name: object())  # no hierarchical namespace


if __name__ == "__main__":
  root, dashes, *flags = sys.argv[1:]
  assert dashes == "--", sys.argv
  sys.argv = [sys.argv[0]] + flags
  install(os.path.abspath(root))
  from mcm_jax import cli, main  # pylint: disable=g-import-not-at-top
  cli.run(main.main, main.parse_flags)
