"""The one training loop: optax, EMA, orbax restore-or-init, progress, NaN and SIGTERM handling.

It is objective-agnostic: ``loss_fn(params, batch, rng, step, frozen) -> (loss, metrics)``
with ``frozen`` a pytree that is not trained (e.g. the teacher's parameters). Batches come from
a jit-able ``batch_fn(rng) -> batch``; the batch of step i uses ``fold_in(data_rng, i)``, so the
data position is the step and a resumed run sees exactly the data an uninterrupted one would.
"""
import logging
import os
import signal
import time

import flax
import jax
import jax.numpy as jnp
import optax

from mcm_jax import checkpoint


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jnp.ndarray


class NonFiniteLossError(FloatingPointError):
  pass


def make_optimizer(optim):
  """Adam with linear warmup, global-norm clipping and optional weight decay (config.optim)."""
  lr = optax.linear_schedule(0.0, optim.learning_rate, max(int(optim.warmup_steps), 1))
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


def make_multi_step(train_step, batch_fn, data_rng, num_steps):
  """Fuses ``num_steps`` train steps (batches drawn inside) into one scanned call."""

  def multi_step(state, frozen):
    def body(st, _):
      batch = batch_fn(jax.random.fold_in(data_rng, st.step))
      return train_step(st, batch, frozen)

    state, metrics = jax.lax.scan(body, state, None, length=num_steps)
    return state, jax.tree_util.tree_map(jnp.mean, metrics), jnp.all(
        jnp.isfinite(metrics["loss"]))

  return multi_step


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
          name="train"):
  """Trains ``init_params`` for ``cfg.steps`` and returns the final TrainState.

  ``cfg`` fields: steps, log_every, checkpoint_every, keep_checkpoints, ema_decay, seed, optim.
  Restores the latest checkpoint in ``workdir/checkpoints`` if there is one (a finished run is
  then returned as is); saves every ``checkpoint_every`` steps, at the end, and on SIGTERM
  (then raises SystemExit(143) after the save). A non-finite loss raises NonFiniteLossError
  without saving the bad state.
  """
  tx = make_optimizer(cfg.optim)
  state = init_state(init_params, tx, cfg.seed)
  manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"),
                                    cfg.keep_checkpoints)
  try:
    return _train_loop(state, manager, loss_fn, tx, batch_fn, cfg, frozen, writer, name)
  finally:  # also on errors and SIGTERM: no orbax thread outlives the call
    manager.wait_until_finished()
    manager.close()


def _train_loop(state, manager, loss_fn, tx, batch_fn, cfg, frozen, writer, name):
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info("%s: resumed from step %d", name, int(state.step))
  data_rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
  train_step = make_train_step(loss_fn, tx, cfg.ema_decay)
  chunks = {}

  def run_chunk(n, st):
    if n not in chunks:
      chunks[n] = jax.jit(make_multi_step(train_step, batch_fn, data_rng, n), donate_argnums=0)
    return chunks[n](st, frozen)

  step, start_step, t0 = int(state.step), int(state.step), time.time()
  with _SigtermFlag() as sigterm:
    while step < cfg.steps:
      n = min(cfg.log_every, cfg.steps - step)
      state, metrics, finite = run_chunk(n, state)
      if not bool(finite):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"{name}: the loss became NaN/inf between steps {step} and {step + n} "
            f"(mean loss {float(metrics['loss'])}); last good checkpoint: "
            f"{manager.latest_step()} in {manager.directory}. Lower optim.learning_rate, "
            f"raise optim.warmup_steps or set optim.grad_clip.")
      step += n
      rate = (step - start_step) / max(time.time() - t0, 1e-9)
      metrics = {k: float(v) for k, v in metrics.items()}
      if writer is not None:
        writer.write_scalars(step, {f"{name}/{k}": v for k, v in metrics.items()})
      logging.info("%s: step %d/%d loss %.5g, %.1f steps/s, ETA %.0fs", name, step, cfg.steps,
                   metrics["loss"], rate, (cfg.steps - step) / max(rate, 1e-9))
      if step % cfg.checkpoint_every == 0 or step == cfg.steps or sigterm.raised:
        checkpoint.save(manager, step, state, force=True)
      if sigterm.raised:
        manager.wait_until_finished()
        logging.warning("%s: SIGTERM at step %d; checkpoint saved, exiting", name, step)
        raise SystemExit(143)
  if writer is not None:
    writer.flush()
  return state
