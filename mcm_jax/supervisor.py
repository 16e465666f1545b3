"""``--multihost``: each host's training process runs under a small supervising process.

When process 0 of a JAX job dies, it takes JAX's coordination service with it, and JAX aborts
every other process at once from C++ ("Terminating process because the JAX distributed service
detected fatal errors", a stack trace, exit 134) before Python can act, so the lost-peer watchdog
(``mcm_jax.peers``) cannot speak for it. The supervisor runs the same command as a child,
passes its output and signals through (SIGTERM: preemption), and turns that abort into the
watchdog's kind of line and exit code (``cli.EXIT_LOST_PEER``). The child dies with its
supervisor (Linux ``PR_SET_PDEATHSIG``), so killing either one is a lost process to the others.
"""
import collections
import ctypes
import os
import re
import signal
import subprocess
import sys

from mcm_jax.cli import EXIT_LOST_PEER

CHILD_ENV = "MCM_JAX_SUPERVISED"
JAX_ABORT = b"Terminating process because the JAX distributed service detected fatal errors"
COORDINATOR_GONE = b"Failed to send RPC to coordination service"  # in that line when it is
_PROCESS_LINE = re.compile(rb"process (\d+) of (\d+), ")


def supervised():
  """Whether this process is a supervisor's child (it then runs the job itself)."""
  return os.environ.get(CHILD_ENV) == "1"


def _die_with_parent():
  """In the child, before it runs: SIGKILL when the supervisor dies (Linux)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def lost_coordinator_message(count, workdir):
  """The one line a process stopped by JAX's abort prints, process 0 being gone."""
  return (f"error: lost process 0 of {count or '?'} (the coordinator): JAX stopped this process "
          "at once, its distributed service having gone with process 0 (killed, out of "
          "memory, or its host is gone). Run the same command again on every host: it resumes "
          f"from the last checkpoint in {workdir}.")


def run(workdir, argv=None):
  """Runs this program's command line (``sys.orig_argv``) as a child with ``CHILD_ENV`` set and
  returns its exit code: its own, 128 + N for a signal N, or ``EXIT_LOST_PEER`` (with one line
  on stderr instead of JAX's stack trace) when JAX aborted it because the coordination service,
  and with it process 0, is gone."""
  argv = argv or [sys.executable] + sys.orig_argv[1:]
  child = subprocess.Popen(argv, env=dict(os.environ, **{CHILD_ENV: "1"}),
                           stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  count, aborted, coordinator_gone = None, False, False
  held = collections.deque(maxlen=400)
  try:
    for line in child.stderr:
      match = count is None and _PROCESS_LINE.search(line)
      if match:
        count = int(match.group(2))
      if aborted:  # JAX's stack trace after its abort: shown only if not explained below
        held.append(line)
        continue
      aborted = JAX_ABORT in line
      coordinator_gone = aborted and COORDINATOR_GONE in line
      sys.stderr.buffer.write(line)
      sys.stderr.buffer.flush()
    code = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  # JAX aborts the child; or, while its abort handler is still writing the stack trace, the
  # child's own peer watchdog (mcm_jax.peers) ends it first with EXIT_LOST_PEER: one line
  # either way.
  if coordinator_gone and code in (-signal.SIGABRT, 128 + signal.SIGABRT, EXIT_LOST_PEER):
    print(lost_coordinator_message(count, workdir), file=sys.stderr, flush=True)
    return EXIT_LOST_PEER
  sys.stderr.buffer.write(b"".join(held))
  sys.stderr.buffer.flush()
  return code if code >= 0 else 128 - code
