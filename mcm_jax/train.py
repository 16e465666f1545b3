"""The one training loop: optax, EMA, orbax restore-or-init, progress, NaN / divergence stop and
SIGTERM handling.

It is objective-agnostic: ``loss_fn(params, batch, rng, step, frozen) -> (loss, metrics)``
with ``frozen`` a pytree that is not trained (e.g. the teacher's parameters). Batches come from
either a jit-able ``batch_fn(rng) -> batch`` drawn on device (the batch of step i uses
``fold_in(data_rng, i)``) or a host ``host_batch_fn(step) -> batch`` (this process's slice,
a deterministic function of the step). Either way the data position is the step, so a resumed
run sees exactly the data an uninterrupted one would. With a ``mesh`` (``mcm_jax.sharding``)
the state is sharded by the rules there and the step is ``jax.jit`` with in/out shardings.

Nothing lost: metrics rows are made durable (``writer.flush()``) before every checkpoint and on
every stop, and a resumed run first drops the rows of its own run logged after the restored
step (writers that can: ``JsonlWriter.drop_rows_after``), so the file holds one row per step.
"""
import contextlib
import logging
import os
import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mcm_jax import checkpoint, sharding, storage
from mcm_jax.errors import (  # noqa: F401 (train.X too)
    LossDivergedError, NonFiniteLossError, StorageError, unanswered_store, write_failure)


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jnp.ndarray


# The divergence guard's reference: the median loss of the run's first REFERENCE_STEPS steps.
# With a warmup both are at the initial parameters (the learning rate starts at 0, so step 0's
# update is zero), i.e. the loss of the untrained model, measured before anything can diverge: a run
# with learning rate 1e10 is ~1e22 from its third step on, so the first logged chunks cannot be
# the reference. The guard is therefore armed from the first logged chunk (no warm-up), and a
# loss that falls from its start never trips it. The reference is saved in every checkpoint,
# so a resumed run uses its own first losses (a checkpoint without one: the first steps after
# the resume).
REFERENCE_STEPS = 2


def learning_rate_schedule(optim):
  """``lr(step)``: linear from 0 at step 0 to ``optim.learning_rate`` at ``warmup_steps``, then
  constant; with ``warmup_steps=0`` constant from step 0 (a 1-step run updates)."""
  if int(optim.warmup_steps) == 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, int(optim.warmup_steps))


def make_optimizer(optim):
  """Adam with linear warmup, global-norm clipping and optional weight decay (config.optim)."""
  lr = learning_rate_schedule(optim)
  chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
  chain.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  return optax.chain(*chain)


def init_state(params, tx, seed):
  """A fresh state. params / EMA are copies, so donating the state never donates a caller's
  arrays (e.g. a teacher that initialises its student and is also passed as ``frozen``)."""
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  params = copy(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=copy(params),
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))


def make_train_step(loss_fn, tx, ema_decay):
  """``train_step(state, batch, frozen) -> (state, metrics)``: one optimizer + EMA update."""

  def train_step(state, batch, frozen):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, rng, state.step, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics

  return train_step


def make_multi_step(train_step, batch_fn, data_rng, num_steps, mesh=None):
  """Fuses ``num_steps`` train steps into one scanned call ``(state, frozen, batches)``.

  ``batch_fn`` set: batches are drawn on device and ``batches`` is None; otherwise ``batches``
  holds the ``num_steps`` host batches stacked on a leading axis.
  """

  def multi_step(state, frozen, batches):
    def body(st, batch):
      if batch is None:
        batch = batch_fn(jax.random.fold_in(data_rng, st.step))
      if mesh is not None:
        batch = jax.lax.with_sharding_constraint(batch, sharding.batch_sharding(mesh))
      with sharding.tracing_on(mesh):
        return train_step(st, batch, frozen)

    if num_steps == 1:  # no scan: XLA:CPU runs conv nets much slower inside while loops
      state, metrics = body(state, jax.tree_util.tree_map(lambda x: x[0], batches))
    else:
      state, metrics = jax.lax.scan(body, state, batches, length=num_steps)
    losses = jnp.reshape(metrics["loss"], (num_steps,))  # per step, for the divergence guard
    return state, jax.tree_util.tree_map(jnp.mean, metrics), jnp.all(
        jnp.isfinite(metrics["loss"])), losses

  return multi_step


def jit_step(loss_fn, tx, cfg, state, frozen, mesh=None, batch_fn=None, num_steps=1):
  """The jitted call ``(state, frozen, batches) -> (state, mean metrics, finite, losses)`` of
  ``num_steps`` train steps (``make_multi_step``) that ``train`` runs, with the state donated
  and, with a ``mesh``, in / out shardings read from the leaves of ``state`` and ``frozen``
  (arrays, or ShapeDtypeStructs with shardings: ``mcm_jax.plan`` lowers this same call for
  abstract TPU devices). Unused inputs stay parameters (``keep_unused``): they occupy device
  memory all the same (e.g. CT's ``frozen``), so the executable's memory analysis counts them."""
  data_rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
  step = make_multi_step(make_train_step(loss_fn, tx, cfg.ema_decay), batch_fn, data_rng,
                         num_steps, mesh)
  if mesh is None:
    return jax.jit(step, donate_argnums=0, keep_unused=True)
  shardings = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
  rep = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=0, keep_unused=True,
                 in_shardings=(shardings(state), shardings(frozen),
                               sharding.stacked_batch_sharding(mesh)),
                 out_shardings=(shardings(state), rep, rep, rep))


def _stacked_host_batches(host_batch_fn, start, num_steps, mesh):
  """Batches of steps [start, start + num_steps) stacked to [num_steps, B, ...], on device."""
  batches = [host_batch_fn(i) for i in range(start, start + num_steps)]
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
  if mesh is None:
    return jax.device_put(stacked)
  return sharding.shard_batch(stacked, mesh, stacked=True)


def on_any_process(flag):
  """``flag`` or'ed over all processes (one tiny all-gather that every process must call), so
  that a SIGTERM reaching one host stops every host at the same step."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class _SigtermFlag:
  """Records SIGTERM (preemption) so the loop can checkpoint and stop between steps."""

  def __enter__(self):
    self.raised = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    self.raised = True

  def __exit__(self, *_):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train(loss_fn, init_params, batch_fn, cfg, workdir, *, frozen=None, writer=None,
          name="train", mesh=None, host_batch_fn=None, data_spec=None, periodic=()):
  """Trains ``init_params`` for ``cfg.steps`` and returns the final TrainState.

  Pass ``batch_fn`` (device) or ``host_batch_fn`` (host), not both. ``mesh``: shard state,
  batches and ``frozen`` over it (restoring a checkpoint written on another mesh works).

  ``cfg`` fields: steps, log_every, checkpoint_every, keep_checkpoints, ema_decay, seed, optim,
  and optionally fuse_steps (scan ``log_every`` steps into one call; default False).
  ``data_spec``: a JSON-able description of the data stream (dataset, size, seed, global batch),
  saved with every checkpoint beside the position (the step); a resume with another one fails.
  ``periodic``: ``(every, fn)`` pairs; ``fn(step, state)`` runs after steps that are multiples
  of ``every`` (e.g. sample grids; checked at log boundaries, so ``every`` should be a multiple
  of ``cfg.log_every``).
  Restores the newest readable checkpoint in ``workdir/checkpoints`` if there is one (a
  finished run is then returned as is; a damaged step is logged and the previous one used, see
  ``checkpoint.restore_latest``); removes unfinished saves of a killed run first. Saves every
  ``checkpoint_every`` steps, at the end, and on SIGTERM (then raises SystemExit(143) after the
  save; with several processes, a SIGTERM to any stops all at the same step). A non-finite loss raises NonFiniteLossError, a logged mean loss above
  ``cfg.divergence_factor`` (default 1e3; 0 disables) x the reference (``REFERENCE_STEPS``)
  raises LossDivergedError; neither saves the bad state.
  """
  if (batch_fn is None) == (host_batch_fn is None):
    raise ValueError("train: pass exactly one of batch_fn (device) and host_batch_fn (host)")
  tx = make_optimizer(cfg.optim)
  state = init_state(init_params, tx, cfg.seed)
  if mesh is not None:
    state = sharding.put(state, sharding.tree_shardings(state, mesh))
    frozen = sharding.put(frozen, sharding.tree_shardings(frozen, mesh))
  checkpoint.remove_stale_tmp_dirs(os.path.join(workdir, "checkpoints"))
  checkpoint.quiet_writer_reports()
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"),
                                    cfg.keep_checkpoints)
  finished = False
  try:
    with _storage_faults(manager, name):
      state = _train_loop(state, manager, loss_fn, tx, batch_fn, host_batch_fn, cfg, frozen,
                          writer, name, mesh, data_spec, periodic)
    finished = True
    return state
  finally:  # also on errors and SIGTERM: no orbax thread outlives the call
    try:
      with _storage_faults(manager, name):  # the last (asynchronous) save completes here
        manager.wait_until_finished()
    except StorageError:
      if finished:
        raise
    manager.close()


def _steps_gone(manager):
  """Whether none of the steps ``manager`` saved (finished or being written) is in its directory
  any more: the workdir was unmounted or deleted under the run."""
  directory = str(manager.directory)
  names = storage.listdir(directory) if storage.isdir(directory) else []
  return not any(n == str(s) or n.startswith(f"{s}.orbax-checkpoint-tmp")
                 for s in manager.all_steps() for n in names)


@contextlib.contextmanager
def _storage_faults(manager, name):
  """A failed write of a checkpoint (or of the metrics beside it) becomes one StorageError
  naming the run, the workdir, the fault and the newest complete checkpoint, which a re-run
  resumes from; the save in progress is left as orbax's tmp directory (removed on the next
  start). A workdir that is gone (unmounted, deleted) is named as such."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    if isinstance(e, (StorageError, NonFiniteLossError)):
      raise
    fault, unanswered = write_failure(e), unanswered_store(e)
    try:
      latest = manager.latest_step()
      vanished = latest is not None and not unanswered and _steps_gone(manager)
    except Exception:  # pylint: disable=broad-exception-caught
      latest, vanished = None, False
    workdir = os.path.dirname(str(manager.directory))
    if vanished:  # an unmounted or deleted workdir: the error takes many shapes, all this one
      reason = fault or f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      raise StorageError(
          f"{name}: the workdir {workdir} vanished while a checkpoint was written (its step "
          f"{latest} is gone; {reason}). Remount or restore it and run the same command again: "
          "it resumes from its newest complete checkpoint, or starts over without one.") from e
    if fault is None:
      raise
    then = ("it starts over: no checkpoint was completed" if latest is None else
            f"it resumes from step {latest}, the newest complete checkpoint")
    fix = ("Once the store answers, run" if unanswered else
           "Free space (or point --workdir somewhere writable) and run")
    raise StorageError(
        f"{name}: a write under {workdir} failed: {fault}. {fix} the same command again; "
        f"{then}.") from e


def _train_loop(state, manager, loss_fn, tx, batch_fn, host_batch_fn, cfg, frozen, writer,
                name, mesh, data_spec, periodic):
  restored = checkpoint.restore_latest(manager, state, data_spec)  # onto ``state``'s shardings
  early_losses = []  # the divergence guard's reference losses (REFERENCE_STEPS)
  if restored is not None:
    state, info = restored
    early_losses = list(info.get("early_losses", []))
    logging.info("%s: resumed from step %d", name, int(state.step))
  drop_rows = getattr(writer, "drop_rows_after", None)  # JsonlWriter; clu's writers cannot
  if drop_rows is not None:  # rows a killed run logged after its checkpoint (all: fresh start)
    drop_rows(name, int(state.step))
  divergence_factor = float(cfg.get("divergence_factor", 1e3))
  fuse = cfg.get("fuse_steps", False)
  compiled = {}

  def run_chunk(n, st, start):
    """n steps: one scanned call when ``cfg.fuse_steps`` (fast for small models, e.g. the toy
    MLP; XLA:CPU runs conv nets ~15x slower inside a scan), else one jitted call per step."""
    key = n if fuse else 1
    if key not in compiled:
      compiled[key] = jit_step(loss_fn, tx, cfg, st, frozen, mesh, batch_fn, key)
    if fuse:
      batches = None if host_batch_fn is None else _stacked_host_batches(
          host_batch_fn, start, n, mesh)
      return compiled[key](st, frozen, batches)
    all_metrics, all_finite, all_losses = [], [], []
    for i in range(start, start + n):
      batches = None if host_batch_fn is None else _stacked_host_batches(
          host_batch_fn, i, 1, mesh)
      st, metrics, finite, losses = compiled[key](st, frozen, batches)
      all_metrics.append(metrics)
      all_finite.append(finite)
      all_losses.append(losses)
    mean = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
    return st, mean, jnp.all(jnp.stack(all_finite)), jnp.concatenate(all_losses)

  def stop(error_cls, what, hint=""):
    """Raises ``error_cls`` (after the pending save and the metrics flush); the state of the
    chunk that failed is not saved."""
    manager.wait_until_finished()
    if writer is not None:
      writer.flush()
    latest = manager.latest_step()
    raise error_cls(
        f"{name}: {what}; last good checkpoint: {'none' if latest is None else latest} in "
        f"{manager.directory}. Lower optim.learning_rate, raise optim.warmup_steps or set "
        f"optim.grad_clip{hint}.")

  step, start_step, t0 = int(state.step), int(state.step), time.time()
  with _SigtermFlag() as sigterm:
    while step < cfg.steps:
      n = min(cfg.log_every, cfg.steps - step)
      state, metrics, finite, losses = run_chunk(n, state, step)
      if not bool(finite):
        stop(NonFiniteLossError, f"the loss became NaN/inf between steps {step} and {step + n} "
             f"(mean loss {float(metrics['loss'])})")
      if len(early_losses) < REFERENCE_STEPS:
        early_losses += [float(x) for x in np.asarray(losses)[:REFERENCE_STEPS -
                                                              len(early_losses)]]
      reference = float(np.median(early_losses))  # a ratio means nothing for losses <= 0
      if divergence_factor > 0 and reference > 0 and float(
          metrics["loss"]) > divergence_factor * reference:
        stop(LossDivergedError, f"the loss diverged between steps {step} and {step + n}: mean "
             f"loss {float(metrics['loss']):.4g} > divergence_factor {divergence_factor:g} x "
             f"{reference:.4g} (the median loss of the run's first {REFERENCE_STEPS} steps, at "
             "its initial parameters)", hint=" (or raise divergence_factor; 0 disables this "
             "check)")
      step += n
      rate = (step - start_step) / max(time.time() - t0, 1e-9)
      metrics = {k: float(v) for k, v in metrics.items()}
      if writer is not None:
        writer.write_scalars(step, {f"{name}/{k}": v for k, v in metrics.items()})
      logging.info("%s: step %d/%d loss %.5g, %.1f steps/s, ETA %.0fs", name, step, cfg.steps,
                   metrics["loss"], rate, (cfg.steps - step) / max(rate, 1e-9))
      stopping = on_any_process(sigterm.raised)  # every process saves the same step
      if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
        if writer is not None:  # rows up to ``step`` durable before the checkpoint claiming them
          writer.flush()
        checkpoint.save(manager, step, state, data_spec, force=True, early_losses=early_losses)
      for every, fn in periodic:
        if step % every == 0 and step < cfg.steps and not stopping:
          fn(step, state)
      if stopping:
        manager.wait_until_finished()
        logging.warning("%s: SIGTERM at step %d; checkpoint saved, exiting", name, step)
        raise SystemExit(143)
  if writer is not None:
    writer.flush()
  return state
