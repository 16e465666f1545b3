"""A watchdog for multi-process runs: a process whose peer died stops with one clear line.

Without it, when one process of a multi-host job dies (OOM kill, a lost node), the others block
in their next collective until JAX's coordination service notices the missing heartbeats and
aborts them with a C++ stack trace. Here every process bumps its own counter in JAX's
distributed key-value store every ``interval`` seconds; a process that has not seen a peer's
counter move for ``timeout`` seconds (or cannot reach the store: process 0 holds it) logs which
process was lost and how to resume, and exits with ``EXIT_LOST_PEER``. Counters, not clocks, so
hosts' clocks need not agree. A process that finishes marks itself done and is not waited for.
The death of process 0 itself is answered by ``mcm_jax.supervisor`` (JAX aborts the others first).
"""
import os
import sys
import threading
import time

from mcm_jax.cli import EXIT_LOST_PEER

_PREFIX = "mcm_jax/peers"


def lost_peer_message(lost, count, timeout, workdir):
  """The one line a surviving process prints."""
  which = f"process {lost} of {count}" + (" (the coordinator)" if lost == 0 else "")
  return (f"error: lost {which}: no sign of it for {timeout:.0f} s (killed, out of memory, or "
          f"its host is gone); this process stops too. Run the same command again on every "
          f"host: it resumes from the last checkpoint in {workdir}.")


def start(client, index, count, timeout, workdir, interval=None):
  """Starts the watchdog thread of process ``index`` of ``count`` on the distributed runtime
  ``client``; returns ``done()``, to call when this process has finished its work. Each round
  is two calls to the store per process (its own counter up, every counter read at once)."""
  interval = interval or max(timeout / 10, 0.5)
  finished = threading.Event()

  def lost(i):
    print(lost_peer_message(i, count, timeout, workdir), file=sys.stderr, flush=True)
    os._exit(EXIT_LOST_PEER)  # the main thread may be blocked in a collective

  def watch():
    seen = {i: (None, time.monotonic()) for i in range(count) if i != index}
    while not finished.is_set():
      now = time.monotonic()
      try:
        client.key_value_increment(f"{_PREFIX}/beat/{index}", 1)
        state = dict(client.key_value_dir_get(f"{_PREFIX}/"))
      except Exception:  # pylint: disable=broad-except
        if index != 0 and not finished.is_set():  # the store lives in process 0
          lost(0)
        return
      for i in list(seen):
        if f"{_PREFIX}/done/{i}" in state:
          del seen[i]
          continue
        beat = state.get(f"{_PREFIX}/beat/{i}")
        if beat != seen[i][0]:
          seen[i] = (beat, now)
        elif now - seen[i][1] > timeout:
          lost(i)
      finished.wait(interval)

  threading.Thread(target=watch, name="mcm_jax_peers", daemon=True).start()

  def done():
    finished.set()
    try:
      client.key_value_set(f"{_PREFIX}/done/{index}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  return done
