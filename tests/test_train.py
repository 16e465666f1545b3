"""The training loop: convergence, resume == uninterrupted, NaN stop, SIGTERM checkpoint."""
import functools
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LOGSNR, mlp_denoiser, train_config
from mcm_jax import diffusion, schedules, train
from mcm_jax.data import toy as toy_data


def _cfg(steps, log_every=10, checkpoint_every=20, lr=2e-3):
  return train_config(steps, log_every, checkpoint_every, learning_rate=lr, warmup_steps=5)


def _problem(hidden=32):
  denoise, params = mlp_denoiser(hidden, depth=1, dim=1)  # 1-D data: mixture1d
  loss = functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=LOGSNR)
  batch_fn = lambda rng: {"x": toy_data.mixture1d(rng, 64)}
  return loss, params, batch_fn


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def exact_mixture_denoiser(params, z, t, cond=None, rng=None):
  """E[x | z_t] for mixture1d: 0.5 N(-1, 0.15^2) + 0.5 N(1, 0.15^2)."""
  alpha, sigma = schedules.alpha_sigma(LOGSNR(t))
  alpha, sigma, var = alpha[:, None], sigma[:, None], 0.15 ** 2
  total = alpha ** 2 * var + sigma ** 2
  means = jnp.array([-1.0, 1.0])
  logits = -0.5 * (z - alpha * means) ** 2 / total
  post = means + alpha * var * (z - alpha * means) / total
  return jnp.sum(jax.nn.softmax(logits, axis=-1) * post, axis=-1, keepdims=True)


@pytest.mark.slow  # a 600-step training
def test_diffusion_training_approaches_the_bayes_optimal_loss(tmp_path):
  loss, params, batch_fn = _problem()
  eval_batch = {"x": toy_data.mixture1d(jax.random.PRNGKey(99), 4096)}
  eval_loss = lambda fn, p: np.mean([float(diffusion.diffusion_loss(
      p, eval_batch, jax.random.PRNGKey(k), 0, denoise_fn=fn, logsnr_fn=LOGSNR)[0])
                                     for k in range(10)])
  denoise = loss.keywords["denoise_fn"]
  optimal = eval_loss(exact_mixture_denoiser, None)
  before = eval_loss(denoise, params)
  state = train.train(loss, params, batch_fn, _cfg(600, log_every=100, checkpoint_every=600),
                      str(tmp_path))
  after = eval_loss(denoise, state.ema_params)
  assert int(state.step) == 600
  assert after - optimal < 0.25 * (before - optimal)


def test_resume_equals_uninterrupted(tmp_path):
  loss, params, batch_fn = _problem()
  full = train.train(loss, params, batch_fn, _cfg(40), str(tmp_path / "full"))
  train.train(loss, params, batch_fn, _cfg(20), str(tmp_path / "split"))
  resumed = train.train(loss, params, batch_fn, _cfg(40), str(tmp_path / "split"))
  assert int(resumed.step) == 40
  assert _leaves_equal(full.params, resumed.params)
  assert _leaves_equal(full.opt_state, resumed.opt_state)
  assert _leaves_equal(full.ema_params, resumed.ema_params)
  # ... and differs from a run that did not resume (a test that can fail).
  other = train.train(loss, params, batch_fn, _cfg(20), str(tmp_path / "short"))
  assert not _leaves_equal(full.params, other.params)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
  loss, params, batch_fn = _problem()
  nan_loss = lambda p, b, r, s, f: (lambda l, m: (l * jnp.where(s >= 15, jnp.nan, 1.0), m))(
      *loss(p, b, r, s, f))
  with pytest.raises(train.NonFiniteLossError, match="NaN/inf between steps 10 and 20"):
    train.train(nan_loss, params, batch_fn, _cfg(40, checkpoint_every=10), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]  # the bad state is not saved


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  loss, params, batch_fn = _problem()
  timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  with pytest.raises(SystemExit) as exc:
    train.train(loss, params, batch_fn, _cfg(10_000_000, log_every=10, checkpoint_every=10_000),
                str(tmp_path))
  timer.cancel()
  assert exc.value.code == 143
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and saved[0] % 10 == 0 and 0 < saved[0] < 10_000
  assert signal.getsignal(signal.SIGTERM) is not None  # the old handler is back


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path):
  loss, params, batch_fn = _problem(hidden=32)
  train.train(loss, params, batch_fn, _cfg(10), str(tmp_path))
  loss2, params2, _ = _problem(hidden=16)
  with pytest.raises(ValueError, match=r"does not match this config.*'ema_params/params/Dense_0/"
                     r"bias' has shape \(32,\) in the checkpoint, \(16,\) here"):
    train.train(loss2, params2, batch_fn, _cfg(20), str(tmp_path))


def test_resume_with_another_data_stream_is_refused(tmp_path):
  loss, params, batch_fn = _problem()
  spec = dict(dataset="a", global_batch=8, seed=0)
  train.train(loss, params, batch_fn, _cfg(10), str(tmp_path), data_spec=spec)
  with pytest.raises(ValueError, match=r"another data stream.*'global_batch': \(8, 16\)"):
    train.train(loss, params, batch_fn, _cfg(20), str(tmp_path), data_spec=dict(spec,
                                                                              global_batch=16))
  resumed = train.train(loss, params, batch_fn, _cfg(20), str(tmp_path), data_spec=spec)
  assert int(resumed.step) == 20
