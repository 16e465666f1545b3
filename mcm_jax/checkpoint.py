"""Orbax checkpointing: restore-or-init for a pytree train state."""
import os

import jax
import orbax.checkpoint as ocp


def make_manager(directory, max_to_keep=3, async_save=True):
  """A CheckpointManager over ``directory`` (created if missing), keeping ``max_to_keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager, step, state, force=False):
  manager.save(int(step), args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager, like_state):
  """Restores the latest checkpoint shaped like ``like_state``; None when there is none.

  A checkpoint whose tree or shapes do not match raises ValueError naming the directory.
  """
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"checkpoint {manager.directory}/{step} does not match this config's model/optimizer "
        f"(delete it or use another --workdir): {e}") from e
