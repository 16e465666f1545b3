"""The exceptions that mean something to a user (``mcm_jax.cli`` turns them into one message
and an exit code). Raised explicitly by the checks of inputs; this module imports only the
standard library, so the pure math modules (schedules, samplers, losses) raise them too."""
import errno
import os


class UserError(ValueError):
  """Bad input: a config value, a flag, a path, a file's contents. The message names what was
  wrong, the value or path, and what is allowed (or what to do)."""


class ConfigError(UserError):
  """A config value or ``--config.<field>`` override that is not allowed
  (``config_validation``)."""


class MissingExtraError(UserError, ImportError):
  """An optional package the input needs is not installed; the message names the extra to
  install (e.g. ``pip install -e '.[demo]'``)."""


class IncompatibleCheckpointError(UserError):
  """A readable checkpoint of another model / optimizer / layout / data stream."""


class DamagedCheckpointError(UserError):
  """A checkpoint step (or, from ``checkpoint.restore_latest``, every step) that cannot be
  read."""


class NonFiniteLossError(FloatingPointError):
  """Training stopped: the loss became NaN/inf; the bad state is not saved."""


class LossDivergedError(NonFiniteLossError):
  """Training stopped: the loss rose above ``divergence_factor`` x its reference; the bad state
  is not saved. A NonFiniteLossError, so whatever handles that stop handles this one."""


class StorageError(UserError):
  """The workdir could not be written (disk full, read-only, gone): the save in progress is
  abandoned; the checkpoints completed before it stand, and a re-run resumes from the newest."""


# What a failed write looks like: an OSError with one of these errnos, or tensorstore's status
# text inside the ValueError / RuntimeError that orbax re-raises from its writer threads. Only
# write-specific signs: a missing or unreadable file is a read error too, and XLA's device
# out-of-memory is also a RuntimeError 'RESOURCE_EXHAUSTED: ...'.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_WRITE_FAILURES = ("No space left on device", "Read-only file system", "Disk quota exceeded",
                   "Failed writing", "Error writing")


TRANSIENT_HTTP_CODES = (408, 429, 500, 502, 503, 504)


def is_transient(exc):
  """Whether ``exc`` is an object store's passing fault: a timeout, a dropped connection, or an
  HTTP error (gcsfs' ``HttpError``, s3fs' errors carry ``code``) with a status worth retrying."""
  return (isinstance(exc, (TimeoutError, ConnectionError))
          or getattr(exc, "code", None) in TRANSIENT_HTTP_CODES)


def _chain(exc):
  """``exc`` and the exceptions it was raised from."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def unanswered_store(exc):
  """Whether the fault behind ``exc`` is an object store that did not answer (``is_transient``,
  still failing after ``storage``'s retries)."""
  return any(is_transient(e) for e in _chain(exc))


def write_failure(exc):
  """The first line of the storage fault behind ``exc`` (``exc`` or an exception it was raised
  from): a failed write, or an object store that did not answer; None for anything else."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return f"{os.strerror(e.errno)} ({e.filename or e})"
    if is_transient(e):
      return f"the object store did not answer ({type(e).__name__}: {str(e).splitlines()[0]})"
    text = str(e)
    if isinstance(e, (ValueError, RuntimeError)) and any(m in text for m in _WRITE_FAILURES):
      # tensorstore: 'STATUS: Error writing "<key>" in ... "<path>": ...: <the OS's reason>'
      first = text.splitlines()[0]
      status, reason = first.split(":", 1)[0], first.rsplit(": ", 1)[-1]
      if status.isupper() and reason != first:
        return f"{status}, {reason}"
      return first[:300]
  return None
