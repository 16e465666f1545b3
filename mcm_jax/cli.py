"""How the command-line programs report errors, and their shared flag helpers.

The programs (``python -m mcm_jax.main``, ``mcm_jax.generate``, ``mcm_jax.t2i_eval``) run through
``run``, which prints a user error (``mcm_jax.errors``) as one message on stderr (``error: ...``,
naming what was wrong, the value or path and what is allowed) without a traceback, and exits
with

  0    done
  1    an unexpected error: a bug or an environment problem; the traceback is printed
  2    bad input (``EXIT_BAD_INPUT``): see ``describe``
  3    training stopped (``EXIT_STOPPED``): the loss became NaN/inf or diverged; the last good
       checkpoint is kept and the message says what to change
  4    another process of a multi-host job was lost (``EXIT_LOST_PEER``, ``mcm_jax.peers``)
  143  preempted (SIGTERM): a checkpoint was saved; re-running the command resumes

``--debug`` (or the environment variable ``MCM_JAX_DEBUG=1``) prints the full traceback of
every error instead. This module imports only absl (it runs before anything heavy).
"""
import os
import re
import sys

from absl import app, flags

from mcm_jax.errors import NonFiniteLossError, UserError, unanswered_store, write_failure

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_LOST_PEER = 4
DEBUG_ENV = "MCM_JAX_DEBUG"

# OSErrors about a path the user gave (each names it).
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                FileExistsError)


def describe(exc):
  """``(message, exit code)`` when ``exc`` is a user error or a training stop, else None.

  User errors (exit 2): ``errors.UserError`` and its subclasses (``ConfigError``,
  ``MissingExtraError``), absl's ``app.UsageError``, and ``FileNotFoundError`` and the other
  OSErrors about a path (not found, not a directory, permission), and a failed write
  (``errors.write_failure``: a full disk, a read-only directory, an object store that did not
  answer after ``storage``'s retries). A training stop
  (exit 3): ``errors.NonFiniteLossError`` (``LossDivergedError`` included). Anything else is
  unexpected (None: the caller lets the traceback through).
  """
  if isinstance(exc, NonFiniteLossError):
    return f"training stopped: {exc}", EXIT_STOPPED
  if isinstance(exc, (UserError, app.UsageError) + _PATH_ERRORS):
    return str(exc), EXIT_BAD_INPUT
  fault = write_failure(exc)
  if fault is not None:  # a full disk, a read-only directory, a store that did not answer
    if unanswered_store(exc):
      return (f"storage failed: {fault}, after retries. Once the store answers, run the same "
              "command again; training resumes from its newest complete checkpoint."
              ), EXIT_BAD_INPUT
    return (f"a write failed: {fault}. Free space (or point --workdir / --out somewhere "
            "writable) and run the same command again; training resumes from its newest "
            "complete checkpoint."), EXIT_BAD_INPUT
  return None


def debug_requested(argv=None):
  """``--debug`` in ``argv`` (default sys.argv) or ``MCM_JAX_DEBUG=1`` in the environment: read
  directly, since errors can come before the flags are parsed."""
  if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
    return True
  argv = sys.argv if argv is None else argv
  return any(re.fullmatch(r"--?debug(=(1|true|t|yes|y))?", a, re.IGNORECASE) for a in argv[1:])


def call(fn, *args, debug=False, **kwargs):
  """Runs ``fn(*args, **kwargs)``; a user error (see ``describe``) is written to stderr as one
  message and its exit code returned (0 when ``fn`` returns). Other exceptions, and every
  exception when ``debug``, propagate with their traceback."""
  try:
    fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    described = None if debug else describe(e)
    if described is None:
      raise
    message, code = described
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code
  return 0


def _without_traceback(message):
  """An absl flag error that embeds a traceback (ml_collections does so for a config file's
  get_config() errors) -> its first line and the exception's own last line."""
  if "Traceback (most recent call last)" not in message:
    return message
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  head = lines[0].replace(" Error whilst parsing config file:", "").rstrip(":")
  last = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
  return f"{head}: {last}"


def parse_flags(argv, flag_values=flags.FLAGS):
  """Parses ``argv`` into ``flag_values`` (absl's flags_parser); defines ``--debug`` first. A
  bad flag (unknown, unparsable value, not allowed) is a UserError naming it."""
  if "debug" not in flag_values:
    flags.DEFINE_bool("debug", False, f"Print the full traceback of errors (or {DEBUG_ENV}=1).",
                      flag_values=flag_values)
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = _without_traceback(str(e))
    if message.startswith("Unknown command line flag"):
      message += " (--helpshort lists the flags)"
    raise UserError(message) from e


def _reporting_usage_errors(main):
  """``main`` with absl's UsageError turned into a UserError (app.run would print the module's
  whole docstring for it)."""
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      raise UserError(str(e)) from e
  return wrapped


def run(main, flags_parser=parse_flags):
  """Runs an absl ``main`` as a command-line program (in ``if __name__ == '__main__'``):
  ``flags_parser(argv)`` defines and parses the flags; errors become a message and an exit code
  as in this module's docstring. Never returns."""
  sys.exit(call(app.run, _reporting_usage_errors(main), flags_parser=flags_parser,
                debug=debug_requested()))


def positive_int(text):
  """An argparse ``type``: an integer >= 1 (argparse reports anything else with the value)."""
  import argparse  # pylint: disable=g-import-not-at-top
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer >= 1")
  return value


def comma_list(allowed):
  """An argparse ``type``: a comma-separated non-empty list of items of ``allowed``."""
  import argparse  # pylint: disable=g-import-not-at-top

  def parse(text):
    items = [s.strip() for s in text.split(",")]
    bad = [s for s in items if s not in allowed]
    if bad or not text.strip():
      raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a comma-separated list "
                                       f"of {', '.join(allowed)}")
    return items

  return parse


def require_flags(flag_values, names):
  """UserError naming the first flag of ``names`` left unset, with its help text."""
  for name in names:
    if not flag_values[name].value:
      raise UserError(f"--{name} is required ({flag_values[name].help})")
