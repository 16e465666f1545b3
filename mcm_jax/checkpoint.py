"""Orbax checkpointing: restore-or-init for a pytree train state.

Each checkpoint step holds two items: ``state`` (the train state pytree, sharded arrays) and
``data`` (JSON: the data stream's position -- the step -- and a description of the stream, so
a resume that would read different data is refused instead of silently diverging; plus the
run's first losses, the divergence guard's reference in ``mcm_jax.train``).

Damage: a step that cannot be read (a truncated or missing file, an empty item, a half-written
step directory) is logged in one line and the next older step is tried; when one is read, the
damaged newer ones are moved aside to ``<step>.damaged`` (kept, and no longer in the way of the
run writing that step again). No readable step at all is one ``DamagedCheckpointError`` naming
the directory. A readable checkpoint of another model or data stream is the user's choice, not
damage: ``IncompatibleCheckpointError``, never fallen back from.
"""
import contextlib
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mcm_jax.config_diff import differing_fields
from mcm_jax.errors import (DamagedCheckpointError, IncompatibleCheckpointError, UserError,
                            write_failure)

STATE, DATA = "state", "data"
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes a step as <step>.orbax-checkpoint-tmp-<time>
# What reading a damaged step raises: tensorstore / orbax ValueErrors (missing manifest, short
# file, pytree without its _METADATA), JSONDecodeError (empty data item), FileNotFoundError, ...
_READ_ERRORS = (DamagedCheckpointError, OSError, ValueError, KeyError, TypeError, IndexError)


def _read_error(exc):
  """The read error behind ``exc``, or None when ``exc`` is not one. Orbax re-raises an array
  read's error as a bare ``Exception("Encountered error while reading array index ...")`` from
  it, which of the two surfaces first depends on timing."""
  if isinstance(exc, _READ_ERRORS):
    return exc
  if type(exc) is Exception and isinstance(exc.__cause__, _READ_ERRORS):  # pylint: disable=unidiomatic-typecheck
    return exc.__cause__
  return None


# orbax writes a replicated array as one slice per replica, in parallel; below this many bytes
# per slice, dispatching the slices costs more than the parallel writes save.
MIN_REPLICA_SLICE_BYTES = 2 ** 20


def _state_handler():
  """orbax's PyTree handler (the one its StandardCheckpointHandler wraps) with jax.Arrays
  written replica-parallel only in slices of at least ``MIN_REPLICA_SLICE_BYTES``."""
  handlers = ocp.type_handlers
  registry = handlers.create_type_handler_registry(
      (jax.Array, handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
      (np.ndarray, handlers.NumpyHandler()), (np.number, handlers.ScalarHandler()),
      (int, handlers.ScalarHandler()), (float, handlers.ScalarHandler()),
      (str, handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(directory, max_to_keep=3, async_save=True):
  """A CheckpointManager over ``directory`` (created if missing), keeping ``max_to_keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  # The handler is named up front so that a fresh manager can read a checkpoint's metadata.
  directory = directory if "://" in directory else os.path.abspath(directory)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={STATE: _state_handler(),
                                              DATA: ocp.JsonCheckpointHandler()})


def remove_stale_tmp_dirs(directory):
  """Deletes ``*.orbax-checkpoint-tmp-*`` entries of ``directory``: saves that a killed run never
  finished (orbax ignores them, so nothing is lost). Process 0 only; call before training
  starts saving there. Returns the names removed."""
  path = epath.Path(directory)
  if jax.process_index() != 0 or not path.is_dir():
    return []
  stale = sorted(p for p in path.iterdir() if TMP_MARK in p.name)
  for p in stale:
    if p.is_dir():
      p.rmtree()
    else:
      p.unlink()
  if stale:
    logging.warning("removed %d unfinished checkpoint save(s) of an interrupted run from %s: %s",
                    len(stale), path, ", ".join(p.name for p in stale))
  return [p.name for p in stale]


def save(manager, step, state, data_spec=None, force=False, early_losses=None):
  """Saves ``state`` and ``{"position": step, "stream": data_spec, "early_losses": ...}`` as
  checkpoint ``step``."""
  info = {"position": int(step), "stream": data_spec}
  if early_losses is not None:
    info["early_losses"] = [float(x) for x in early_losses]
  manager.save(int(step), force=force, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(info)}))


def shapes_by_path(tree):
  """{('params', 'Dense_0', 'kernel'): shape} for arrays and orbax ArrayMetadata alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[key] = tuple(getattr(leaf, "shape", ()))
  return out


def check_compatible(stored, expected, where):
  """Raises IncompatibleCheckpointError (a ValueError) naming the first parameter whose
  presence or shape differs."""
  for path in sorted(set(stored) | set(expected)):
    name = "/".join(path)
    if path not in stored:
      problem = f"'{name}' (shape {expected[path]}) is missing from the checkpoint"
    elif path not in expected:
      problem = f"the checkpoint has '{name}' (shape {stored[path]}) that this model lacks"
    elif stored[path] != expected[path]:
      problem = f"'{name}' has shape {stored[path]} in the checkpoint, {expected[path]} here"
    else:
      continue
    raise IncompatibleCheckpointError(
        f"checkpoint {where} does not match this config's model/optimizer: {problem} (delete it "
        "or use another --workdir)")


def check_stored(manager, step, like, subtree=None):
  """Checks checkpoint ``step`` (or its top-level entry ``subtree``) against the tree ``like``
  from its metadata, before any restore: IncompatibleCheckpointError names the first
  mismatching parameter; DamagedCheckpointError when the ``state`` item is missing."""
  where = f"{manager.directory}/{step}"
  items = manager.item_metadata(step)
  if STATE not in items.keys():
    if (manager.directory / str(step) / "default").exists():  # a bare state, before DATA
      raise IncompatibleCheckpointError(
          f"checkpoint {where} holds a single 'default' item, not '{STATE}' and '{DATA}': it "
          "was written by an older mcm_jax layout; use another --workdir")
    raise DamagedCheckpointError(f"checkpoint {where} is incomplete or damaged: its '{STATE}' "
                                 "item is missing")
  stored = getattr(items[STATE], "tree", items[STATE])
  if stored is None:
    return
  if subtree is not None:
    stored, where = stored[subtree], f"{where} ({subtree})"
  check_compatible(shapes_by_path(stored), shapes_by_path(like), where)


def _closed_loop(exc):
  """Whether ``exc`` is a callback's report aimed at orbax's closed asyncio loop."""
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_writer_reports():
  """When a save fails, orbax's writer threads and the coroutines left on its closed asyncio
  loop print a traceback each ('RuntimeError: Event loop is closed', tensorstore's write
  errors, 'Future exception was never retrieved', '_SignalingThread.run() raised'): hundreds of
  lines around the one exception that matters, which the training loop reports. Those reports
  (only those) are dropped for the rest of the process. Installed once."""
  if getattr(sys.excepthook, "drops_closed_loop_reports", False):
    return
  old_excepthook, old_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    if not _closed_loop(value):
      old_excepthook(kind, value, tb)

  def unraisable(report):
    exc, code = report.exc_value, getattr(report.object, "cr_code", None)
    orbax_coroutine = code is not None and "orbax" in code.co_filename  # collected at exit
    if not (_closed_loop(exc) or orbax_coroutine
            or (write_failure(exc) and not isinstance(exc, UserError))):
      old_unraisable(report)

  excepthook.drops_closed_loop_reports = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisable
  logging.getLogger("asyncio").addFilter(
      lambda record: not ("exception was never retrieved" in record.getMessage()
                          and write_failure(record.exc_info and record.exc_info[1])))
  logging.getLogger("absl").addFilter(
      lambda record: not ("_SignalingThread.run() raised" in record.getMessage()
                          or (record.exc_info and write_failure(record.exc_info[1]))))


@contextlib.contextmanager
def _quiet_failed_read(step_dir):
  """A failed orbax read of ``step_dir`` leaves, besides its exception, tensorstore callbacks
  aimed at orbax's closed asyncio loop (each printing a 'RuntimeError: Event loop is closed'
  traceback) and failed futures that asyncio logs as 'Future exception was never retrieved'
  with tensorstore's whole spec, and read errors of abandoned array reads raised where nobody
  catches them ('Exception ignored ...', the spec naming ``step_dir``): dozens for one short
  file, some after the read has raised. Those reports (only those) are dropped during the read
  and, if it fails, for the rest of the process; the failure itself is reported once, by the
  caller."""
  old_hook = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if not _closed_loop(exc) and not any(f"{d}/" in str(exc) for d in hook.step_dirs):
      old_hook(unraisable)

  def keep(record):
    text = record.getMessage()
    return not ("exception was never retrieved" in text and f"{step_dir}/" in text)

  if getattr(old_hook, "drops_closed_loop_reports", False):
    old_hook.step_dirs.append(step_dir)  # the hook installed by an earlier failed read
  else:
    hook.drops_closed_loop_reports = True
    hook.step_dirs = [step_dir]
    sys.unraisablehook = hook
  asyncio_logger = logging.getLogger("asyncio")
  asyncio_logger.addFilter(keep)
  try:
    yield
  except BaseException:
    raise  # the filters stay
  else:
    asyncio_logger.removeFilter(keep)
    if sys.unraisablehook is hook:
      sys.unraisablehook = old_hook


def _reason(exc, step_dir):
  """The first line of an exception, without tensorstore's spec dump, with paths relative to
  ``step_dir``, at most 400 characters."""
  line = (str(exc).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  line = line.replace(f"{step_dir}/", "")
  line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
  return line if len(line) <= 400 else line[:397] + "..."


def _all_processes(ok):
  """True iff ``ok`` on every process (they must fall back together)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def newest_readable(manager, read):
  """``(step, read(step), [(newer step that could not be read, reason), ...])`` for the newest
  step that ``read`` can read; None when there are no steps. IncompatibleCheckpointError
  propagates at once; no readable step raises DamagedCheckpointError naming the directory and
  each step's reason."""
  steps = sorted(manager.all_steps(), reverse=True)
  failed = []
  for step in steps:
    ok, value = True, None
    try:
      with _quiet_failed_read(manager.directory / str(step)):
        value = read(step)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      if _read_error(e) is None:
        raise
      ok, reason = False, _reason(_read_error(e), manager.directory / str(step))
    if _all_processes(ok):
      return step, value, failed
    failed.append((step, "unreadable on another process" if ok else reason))
  if not failed:
    return None
  raise DamagedCheckpointError(
      f"no readable checkpoint in {manager.directory}: tried steps "
      f"{[s for s, _ in failed]}; " + "; ".join(f"{s}: {r}" for s, r in failed) +
      ". Restore the directory from a backup, or move it away to start from scratch")


def set_aside(manager, steps):
  """Renames the (damaged) step dirs ``steps`` to ``<step>.damaged`` (``.damaged.N`` when that
  exists), which orbax does not list, so the run can write those steps again. Returns
  {step: new name}."""
  names = {}
  for step in steps:
    src, k = manager.directory / str(step), 1
    dst = src.parent / f"{step}.damaged"
    while dst.exists():
      dst, k = src.parent / f"{step}.damaged.{k}", k + 1
    if jax.process_index() == 0:
      src.rename(dst)
    names[step] = dst.name
  if steps and jax.process_count() > 1:
    ocp.multihost.sync_global_processes("mcm_jax_checkpoint_set_aside")
  manager.reload()
  return names


def _log_fallback(manager, failed, step, what):
  """One line per step that could not be read: the step, the reason and what happened."""
  for bad, reason in failed:
    logging.warning("checkpoint %s/%d cannot be read (%s); %s step %d instead", manager.directory,
                    bad, reason, what(bad), step)


def restore_latest(manager, like_state, data_spec=None):
  """``(state, info)`` of the newest readable checkpoint, shaped like ``like_state``; None
  when there is none. ``info`` is the step's JSON item (position, stream, early_losses).

  Each step's stored tree is checked against ``like_state`` first, so a checkpoint from another
  model raises IncompatibleCheckpointError (a ValueError) naming the parameter; the stored data
  stream must equal ``data_spec`` (the same error naming the differing fields otherwise). A step
  that cannot be read is logged and the previous one tried; damaged steps newer than the one
  restored are moved aside (``set_aside``). None readable: DamagedCheckpointError.
  """
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)

  def read(step):
    check_stored(manager, step, like_state)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        DATA: ocp.args.JsonRestore()}))
    info = restored[DATA]
    if info["position"] != step:
      raise DamagedCheckpointError(f"its data item is of step {info['position']}")
    if info["stream"] != data_spec:
      diff = differing_fields(info["stream"], data_spec)
      raise IncompatibleCheckpointError(
          f"checkpoint {manager.directory}/{step} was written reading another data stream, so "
          f"resuming would not continue the run exactly: (checkpoint, now) = {diff}. Restore "
          "those settings or use another --workdir")
    return restored[STATE], info

  found = newest_readable(manager, read)
  if found is None:
    return None
  step, (state, info), failed = found
  names = set_aside(manager, [s for s, _ in failed])
  _log_fallback(manager, failed, step, lambda bad: f"kept as {names[bad]}, resuming from")
  return state, info


def restore_subtree(manager, step, subtree, like):
  """Only the top-level entry ``subtree`` (e.g. 'ema_params') of checkpoint ``step``, shaped and
  sharded like ``like`` (arrays or ShapeDtypeStructs with shardings): the rest of the state
  (optimizer moments, ...) is never read, and each host reads only its shards."""
  check_stored(manager, step, like, subtree=subtree)
  abstract = {subtree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)}
  path = os.path.join(str(manager.directory), str(step), STATE)  # the manager's item dir
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  return restored[subtree]


def load_ema_params(run_dir, like, what="config.init_from"):
  """(EMA parameters, step) of the newest readable checkpoint in ``run_dir`` (a run's workdir),
  shaped and sharded like ``like``. Only the ``ema_params`` entry is read (partial restore), each
  host its own shards; a damaged step is logged and the previous one read (nothing is moved:
  the directory is another run's). Errors name the path (as ``what``), the mismatching
  parameter, or (DamagedCheckpointError) the steps that could not be read."""
  directory = os.path.join(run_dir, "checkpoints")
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"{what}={run_dir!r} has no checkpoints/ directory; train the "
                            "model there first")
  manager = make_manager(directory, async_save=False)
  try:
    found = newest_readable(manager, lambda s: restore_subtree(manager, s, "ema_params", like))
  finally:
    manager.close()
  if found is None:
    raise FileNotFoundError(f"{what}={run_dir!r}: no finished checkpoint in {directory}")
  step, params, failed = found
  _log_fallback(manager, failed, step, lambda bad: "reading")
  logging.info("EMA parameters of %s step %d", directory, step)
  return params, step
