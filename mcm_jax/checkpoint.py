"""Orbax checkpointing: restore-or-init for a pytree train state.

Each checkpoint step holds two items: ``state`` (the train state pytree, sharded arrays) and
``data`` (JSON: the data stream's position -- the step -- and a description of the stream, so
a resume that would read different data is refused instead of silently diverging).
"""
import logging
import os

import jax
import orbax.checkpoint as ocp


def make_manager(directory, max_to_keep=3, async_save=True):
  """A CheckpointManager over ``directory`` (created if missing), keeping ``max_to_keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  # The handler is named up front so that a fresh manager can read a checkpoint's metadata.
  directory = directory if "://" in directory else os.path.abspath(directory)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={STATE: ocp.StandardCheckpointHandler(),
                                              DATA: ocp.JsonCheckpointHandler()})


STATE, DATA = "state", "data"


def save(manager, step, state, data_spec=None, force=False):
  """Saves ``state`` and ``{"position": step, "stream": data_spec}`` as checkpoint ``step``."""
  manager.save(int(step), force=force, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave({"position": int(step), "stream": data_spec})}))


def shapes_by_path(tree):
  """{('params', 'Dense_0', 'kernel'): shape} for arrays and orbax ArrayMetadata alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[key] = tuple(getattr(leaf, "shape", ()))
  return out


def check_compatible(stored, expected, where):
  """Raises ValueError naming the first parameter whose presence or shape differs."""
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
    raise ValueError(f"checkpoint {where} does not match this config's model/optimizer: "
                     f"{problem} (delete it or use another --workdir)")


def check_stored(manager, step, like, subtree=None):
  """Checks checkpoint ``step`` (or its top-level entry ``subtree``) against the tree ``like``
  from its metadata, before any restore; ValueError names the first mismatching parameter."""
  items = manager.item_metadata(step)
  if STATE not in items.keys():
    raise ValueError(f"checkpoint {manager.directory}/{step} has items {sorted(items.keys())}, "
                     f"not '{STATE}': it was written by an older mcm_jax layout; use another "
                     "--workdir")
  stored = getattr(items[STATE], "tree", items[STATE])
  if stored is None:
    return
  where = f"{manager.directory}/{step}"
  if subtree is not None:
    stored, where = stored[subtree], f"{where} ({subtree})"
  check_compatible(shapes_by_path(stored), shapes_by_path(like), where)


def differing_fields(old, new):
  """{key: (old value, new value)} for the keys where two JSON-like dicts (or None) differ."""
  old, new = old or {}, new or {}
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def restore_latest(manager, like_state, data_spec=None):
  """Restores the latest checkpoint shaped like ``like_state``; None when there is none.

  The stored tree is checked against ``like_state`` first, so a checkpoint from another model
  raises a ValueError naming the parameter (and leaves no orbax work pending); the stored data
  stream must equal ``data_spec`` (ValueError naming the differing fields otherwise).
  """
  step = manager.latest_step()
  if step is None:
    return None
  check_stored(manager, step, like_state)
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract), DATA: ocp.args.JsonRestore()}))
  stored_spec = restored[DATA]["stream"]
  if stored_spec != data_spec:
    diff = differing_fields(stored_spec, data_spec)
    raise ValueError(f"checkpoint {manager.directory}/{step} was written reading another data "
                     f"stream, so resuming would not continue the run exactly: "
                     f"(checkpoint, now) = {diff}. Restore those settings or use another "
                     "--workdir")
  return restored[STATE]


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
  """(EMA parameters, step) of the latest checkpoint in ``run_dir`` (a run's workdir), shaped and
  sharded like ``like``. Only the ``ema_params`` entry is read (partial restore), each host its
  own shards. Errors name the path (as ``what``) or the mismatching parameter."""
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what}={run_dir!r} has no checkpoints/ directory; train the "
                            "model there first")
  manager = make_manager(directory, async_save=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what}={run_dir!r}: no finished checkpoint in {directory}")
    params = restore_subtree(manager, step, "ema_params", like)
  finally:
    manager.close()
  logging.info("EMA parameters of %s step %d", directory, step)
  return params, step
