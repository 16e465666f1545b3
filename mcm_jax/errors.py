"""The exceptions that mean something to a user (``mcm_jax.cli`` turns them into one message
and an exit code). Raised explicitly by the checks of inputs; this module imports nothing, so
the pure math modules (schedules, samplers, losses) raise them too."""


class UserError(ValueError):
  """Bad input: a config value, a flag, a path, a file's contents. The message names what was
  wrong, the value or path, and what is allowed (or what to do).
  ``config_validation.ConfigError`` is one."""


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
