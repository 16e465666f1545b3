"""Nothing lost, nothing obscure: SIGKILL + resume == uninterrupted (params and metrics file),
damaged checkpoints fall back to the previous step, stale orbax tmp dirs go, and a diverging
loss stops like a NaN does."""
import functools
import gc
import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import jax
import ml_collections
import numpy as np
import pytest

from helpers import LOGSNR, mlp_denoiser, train_config
from mcm_jax import checkpoint, config_validation, diffusion, errors, train
from mcm_jax.data import toy as toy_data
from mcm_jax.metric_writer import JsonlWriter

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _cfg(steps, log_every=5, checkpoint_every=10, lr=2e-3, **extra):
  cfg = train_config(steps, log_every, checkpoint_every, learning_rate=lr, warmup_steps=5,
                     batch_size=32)
  cfg.update(extra)
  return cfg


def _problem():
  denoise, params = mlp_denoiser(16, depth=1, dim=1)  # 1-D data: mixture1d
  loss = functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=LOGSNR)
  return loss, params, lambda rng: {"x": toy_data.mixture1d(rng, 32)}


def _train(workdir, steps, name="run", **cfg_extra):
  """Trains the toy problem in ``workdir`` with a JsonlWriter there; returns the final state."""
  loss, params, batch_fn = _problem()
  writer = JsonlWriter(str(workdir))
  try:
    return train.train(loss, params, batch_fn, _cfg(steps, **cfg_extra), str(workdir),
                       writer=writer, name=name)
  finally:
    writer.close()


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return f.read().splitlines()


def _rows(workdir):
  return [json.loads(line) for line in _lines(workdir)]


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _warnings(caplog, text):
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# SIGKILL: a new process resumes to exactly the uninterrupted result, metrics file included.

_SCRIPT = textwrap.dedent("""
    import functools, sys
    sys.path[:0] = [{tests_dir!r}, {tests_dir!r} + "/.."]  # helpers, and this checkout's mcm_jax
    import jax, numpy as np
    from helpers import LOGSNR, mlp_denoiser, train_config
    from mcm_jax import diffusion, train
    from mcm_jax.data import toy as toy_data
    from mcm_jax.metric_writer import JsonlWriter

    workdir, steps = sys.argv[1], int(sys.argv[2])
    denoise, params = mlp_denoiser(16, depth=1, dim=1)
    loss = functools.partial(diffusion.diffusion_loss, denoise_fn=denoise, logsnr_fn=LOGSNR)
    batch_fn = lambda rng: {{"x": toy_data.mixture1d(rng, 32)}}
    cfg = train_config(steps, 2, 10, learning_rate=2e-3, warmup_steps=5, batch_size=32)
    writer = JsonlWriter(workdir)
    state = train.train(loss, params, batch_fn, cfg, workdir, writer=writer, name="run")
    writer.close()
    np.savez(workdir + "/final.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(state)])
""")


def _final(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow  # two training runs in subprocesses (jax import + compile each)
def test_sigkill_at_a_random_point_then_resume_equals_uninterrupted(tmp_path):
  script, steps = tmp_path / "run.py", 300  # the kill comes by step ~100: time to spare
  script.write_text(_SCRIPT.format(tests_dir=TESTS_DIR))
  full = _train(tmp_path / "full", steps, log_every=2)  # uninterrupted (the script's run)
  killed = tmp_path / "killed"
  kill_after_row = random.Random(1234).randrange(12, 100, 2)  # a logged step past checkpoint 10
  proc = subprocess.Popen([sys.executable, str(script), str(killed), str(steps)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      logged = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl")
                if l.endswith("\n")] if (killed / "metrics.jsonl").exists() else []
      saved = (killed / "checkpoints").is_dir() and _steps(killed)
      if saved and logged and logged[-1] >= kill_after_row:
        proc.send_signal(signal.SIGKILL)  # no chance to save or flush anything
        break
      time.sleep(0.01)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (killed / "final.npz").exists() and _steps(killed)[-1] < steps
  subprocess.run([sys.executable, str(script), str(killed), str(steps)], check=True,
                 capture_output=True, timeout=300)  # the resume, in a new process
  assert _leaves_equal(jax.tree_util.tree_leaves(full), _final(killed))
  assert _lines(killed) == _lines(tmp_path / "full")  # same rows, each logged step once
  assert [r["step"] for r in _rows(killed)] == list(range(2, steps + 1, 2))


# ---------------------------------------------------------------------------------------------
# Metrics rows of a killed run after its checkpoint are dropped, never duplicated.

def test_rows_logged_after_the_restored_checkpoint_are_dropped(tmp_path):
  full = _train(tmp_path / "full", 40, checkpoint_every=20)
  other = {"step": 7, "teacher/loss": 0.5}  # another run sharing the file: left alone
  for d in ("full", "split"):
    os.makedirs(tmp_path / d, exist_ok=True)
  with open(tmp_path / "split" / "metrics.jsonl", "w") as f:
    f.write(json.dumps(other) + "\n")
  _train(tmp_path / "split", 30, checkpoint_every=20)  # checkpoints 20 and 30 (the end)
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "30")  # killed before checkpoint 30 ...
  with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
    f.write('{"step": 35, "run/lo')  # ... in the middle of writing the row of step 35
  resumed = _train(tmp_path / "split", 40, checkpoint_every=20)
  assert _leaves_equal(full, resumed)
  assert _rows(tmp_path / "split")[0] == other
  assert _lines(tmp_path / "split")[1:] == _lines(tmp_path / "full")
  assert [r["step"] for r in _rows(tmp_path / "split")[1:]] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_a_restart_from_scratch_drops_the_runs_earlier_rows(tmp_path):
  _train(tmp_path / "full", 20)
  _train(tmp_path / "again", 20)
  shutil.rmtree(tmp_path / "again" / "checkpoints")
  _train(tmp_path / "again", 20)
  assert _lines(tmp_path / "again") == _lines(tmp_path / "full")


def test_jsonl_writer_flush_makes_rows_visible_and_other_runs_stay(tmp_path):
  writer = JsonlWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write_scalars(step, {"a/loss": step})
    writer.write_scalars(step, {"b/loss": step})
  writer.flush()
  assert len(_lines(tmp_path)) == 6
  assert writer.drop_rows_after("a", 1) == 2
  writer.write_scalars(4, {"a/loss": 4})
  writer.close()
  assert _rows(tmp_path) == [{"step": 1, "a/loss": 1.0}, {"step": 1, "b/loss": 1.0},
                             {"step": 2, "b/loss": 2.0}, {"step": 3, "b/loss": 3.0},
                             {"step": 4, "a/loss": 4.0}]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "a/lo')  # a process killed mid-line: the next row must not glue to it
  writer = JsonlWriter(str(tmp_path))
  writer.write_scalars(5, {"a/loss": 5})
  writer.close()
  assert _rows(tmp_path)[-2:] == [{"step": 4, "a/loss": 4.0}, {"step": 5, "a/loss": 5.0}]


def test_metrics_are_flushed_before_every_checkpoint_and_on_a_stop(tmp_path, monkeypatch):
  """For any writer (clu's TensorBoard one buffers), rows reach the disk before a checkpoint
  claims them and before a NaN / divergence stop."""
  events = []

  class SpyWriter:  # no drop_rows_after, like clu's writers: left alone
    def write_scalars(self, step, scalars):
      del scalars
      events.append(("row", step))

    def flush(self):
      events.append(("flush",))

  save = checkpoint.save
  monkeypatch.setattr(checkpoint, "save", lambda manager, step, *args, **kwargs: (
      events.append(("save", step)), save(manager, step, *args, **kwargs))[1])
  loss, params, batch_fn = _problem()
  train.train(loss, params, batch_fn, _cfg(20), str(tmp_path / "a"), writer=SpyWriter())
  saves = [i for i, e in enumerate(events) if e[0] == "save"]
  assert [events[i][1] for i in saves] == [10, 20]
  assert all(events[i - 2:i] == [("row", events[i][1]), ("flush",)] for i in saves)
  events.clear()
  with pytest.raises(train.LossDivergedError):
    train.train(loss, params, batch_fn, _cfg(20, lr=1e10), str(tmp_path / "b"),
                writer=SpyWriter())
  assert events == [("flush",)]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: one log line naming the step, fall back, finish == uninterrupted.

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """An uninterrupted 30-step run: checkpoints 10, 20, 30; (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("base")
  return workdir, _train(workdir, 30)


def _truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))  # the OCDBT array data
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def _remove(*parts):
  def damage(step_dir):
    path = os.path.join(step_dir, *parts)
    assert os.path.exists(path), path
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return damage


def _empty_data_item(step_dir):
  assert os.path.getsize(os.path.join(step_dir, "data", "metadata"))
  open(os.path.join(step_dir, "data", "metadata"), "w").close()


def _half_written(step_dir):
  """A step dir with its final name whose metadata arrived but whose per-process array data
  did not (a copy or a non-atomic write cut off partway). Every data file goes: the files'
  names are content hashes, so any "first half" of them would be a random choice."""
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  assert files
  for f in files:
    os.remove(f)


def _other_steps_copy(step_dir):
  """Step 20's directory under the name of step 30."""
  shutil.rmtree(step_dir)
  shutil.copytree(os.path.join(os.path.dirname(step_dir), "20"), step_dir)


DAMAGE = {
    "truncated_array_file": _truncate_arrays,
    "no_METADATA": _remove("state", "_METADATA"),
    "no_manifest_ocdbt": _remove("state", "manifest.ocdbt"),
    "empty_data_item": _empty_data_item,
    "half_written_step_dir": _half_written,
    "no_state_dir": _remove("state"),
    "another_steps_dir": _other_steps_copy,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(base_run, damage, tmp_path,
                                                                    caplog, capfd, monkeypatch):
  base, full = base_run
  workdir = tmp_path / "run"
  shutil.copytree(base, workdir)
  DAMAGE[damage](str(workdir / "checkpoints" / "30"))
  caplog.set_level(logging.INFO)
  reports = []  # what Python would print as "Exception ignored ..." tracebacks
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reports.append(repr(u.exc_value)))
  resumed = _train(workdir, 30)
  for _ in range(3):  # asyncio logs a failed future nobody awaited when it is collected
    time.sleep(0.1)
    gc.collect()
  assert not reports and not [r.getMessage()[:200] for r in caplog.records if r.name == "asyncio"]
  lines = _warnings(caplog, "cannot be read")
  assert len(lines) == 1 and "checkpoints/30 cannot be read (" in lines[0], lines
  assert lines[0].endswith("; kept as 30.damaged, resuming from step 20 instead")
  assert "resumed from step 20" in caplog.text
  assert _leaves_equal(full, resumed)
  assert _lines(workdir) == _lines(base)  # rows 25 and 30 of the fallen-back run: once
  assert _steps(workdir) == [10, 20, 30] and (workdir / "checkpoints" / "30.damaged").is_dir()
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Traceback" not in err


def test_the_noise_of_a_failed_read_is_dropped_and_nothing_else(tmp_path, caplog, monkeypatch):
  """After a failed read, tensorstore / asyncio report leftovers (closed-loop callbacks, failed
  futures nobody awaited, abandoned array reads' errors naming the step) at times that vary; the
  same reports, made by hand, are dropped, and reports about anything else are kept."""
  reports = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reports.append(str(u.exc_value)))
  unraisable = lambda msg: sys.unraisablehook(types.SimpleNamespace(
      exc_type=RuntimeError, exc_value=RuntimeError(msg), exc_traceback=None, err_msg=None,
      object=None))
  asyncio_logger = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))  # undone after
  step_dir = tmp_path / "checkpoints" / "30"
  with pytest.raises(ValueError):
    with checkpoint._quiet_failed_read(step_dir):  # pylint: disable=protected-access
      raise ValueError("NOT_FOUND")
  unraisable("Event loop is closed")
  unraisable("something else")
  unraisable("Encountered error while reading array index: (slice(0, 2, 1),). See full "
             f"TensorStore details: <TensorStore({{'path': '{step_dir}/state/'}})>")
  unraisable(f"Encountered error while reading array index: <'{tmp_path}/other/30/state/'>")
  asyncio_logger.error("Task exception was never retrieved\nfuture: <Task exception=ValueError("
                       f"'NOT_FOUND: local file \"{step_dir}/state/\"')>")
  asyncio_logger.error("Task exception was never retrieved\nfuture: <Task exception=ValueError("
                       "'elsewhere')>")
  assert reports[0] == "something else" and "other/30" in reports[1] and len(reports) == 2
  kept = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(kept) == 1 and "elsewhere" in kept[0]


def test_orbax_s_wrapped_array_read_error_is_a_read_failure_other_errors_propagate():
  """Orbax re-raises a failed array read as a bare Exception from the tensorstore ValueError (the
  half-written test met either one, by timing); that falls back with the inner reason, while a
  bare Exception without such a cause, or a RuntimeError, is a bug and propagates."""
  manager = types.SimpleNamespace(all_steps=lambda: [30, 20], directory=checkpoint.epath.Path("/c"))

  def wrapped(step):
    if step == 30:
      try:
        raise ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream")
      except ValueError as e:
        raise Exception("Encountered error while reading array index: (slice(0, 2, 1),)") from e  # pylint: disable=broad-exception-raised
    return "state 20"

  step, value, failed = checkpoint.newest_readable(manager, wrapped)
  assert (step, value) == (20, "state 20")
  assert failed == [(30, "ValueError: FAILED_PRECONDITION: Truncated Zstd-compressed stream")]
  for bug in (Exception("no cause"), RuntimeError("a bug")):
    with pytest.raises(type(bug), match=str(bug)):
      checkpoint.newest_readable(manager, lambda step, bug=bug: (_ for _ in ()).throw(bug))


def test_no_state_dir_is_called_incomplete_not_an_older_layout(base_run, tmp_path, caplog):
  shutil.copytree(base_run[0], tmp_path / "run")
  _remove("state")(str(tmp_path / "run" / "checkpoints" / "30"))
  _train(tmp_path / "run", 30)
  line, = _warnings(caplog, "cannot be read")
  assert "incomplete or damaged" in line and "older" not in line


def test_every_checkpoint_damaged_is_one_clear_error(base_run, tmp_path):
  shutil.copytree(base_run[0], tmp_path / "run")
  directory = tmp_path / "run" / "checkpoints"
  for step in (10, 20, 30):
    _truncate_arrays(str(directory / str(step)))
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=rf"no readable checkpoint in {directory}: tried steps \[30, 20, 10\]"):
    _train(tmp_path / "run", 40)
  assert _steps(tmp_path / "run") == [10, 20, 30]  # nothing moved, nothing new written


def test_another_model_is_not_fallen_back_from(base_run, tmp_path):
  shutil.copytree(base_run[0], tmp_path / "run")
  _, params, batch_fn = _problem()
  loss2 = functools.partial(diffusion.diffusion_loss, logsnr_fn=LOGSNR,
                            denoise_fn=mlp_denoiser(8, depth=1, dim=1)[0])
  params2 = mlp_denoiser(8, depth=1, dim=1)[1]
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"^checkpoint \S*checkpoints/30 does not match this config"):
    train.train(loss2, params2, batch_fn, _cfg(30), str(tmp_path / "run"))
  assert _steps(tmp_path / "run") == [10, 20, 30]


def test_teacher_loading_falls_back_from_a_damaged_latest_checkpoint(base_run, tmp_path, caplog):
  like = base_run[1].ema_params
  shutil.copytree(base_run[0], tmp_path / "good")
  shutil.rmtree(tmp_path / "good" / "checkpoints" / "30")
  expected, _ = checkpoint.load_ema_params(str(tmp_path / "good"), like)
  shutil.copytree(base_run[0], tmp_path / "run")
  _truncate_arrays(str(tmp_path / "run" / "checkpoints" / "30"))
  params, step = checkpoint.load_ema_params(str(tmp_path / "run"), like)
  assert step == 20 and _leaves_equal(params, expected)
  line, = _warnings(caplog, "checkpoints/30 cannot be read")
  assert line.endswith("; reading step 20 instead")
  assert (tmp_path / "run" / "checkpoints" / "30").is_dir()  # another run's dir: not moved
  for s in (10, 20):
    _truncate_arrays(str(tmp_path / "run" / "checkpoints" / str(s)))
  with pytest.raises(checkpoint.DamagedCheckpointError, match="no readable checkpoint in .*"
                     r"run/checkpoints: tried steps \[30, 20, 10\]"):
    checkpoint.load_ema_params(str(tmp_path / "run"), like)


def test_stale_orbax_tmp_dirs_are_removed_on_start(base_run, tmp_path, caplog):
  shutil.copytree(base_run[0], tmp_path / "run")
  stale = tmp_path / "run" / "checkpoints" / "40.orbax-checkpoint-tmp-1700000000"
  os.makedirs(stale / "state")
  (stale / "state" / "_METADATA").write_text("{")
  caplog.set_level(logging.INFO)
  _train(tmp_path / "run", 40)
  assert not stale.exists()
  assert len(_warnings(caplog, "removed 1 unfinished checkpoint save")) == 1
  assert _steps(tmp_path / "run")[-1] == 40


# ---------------------------------------------------------------------------------------------
# Divergence guard.

def test_a_diverging_run_stops_like_a_nan_does(tmp_path):
  assert issubclass(train.LossDivergedError, train.NonFiniteLossError)  # handled alike (exit 3)
  # lr 1e10: steps 0 and 1 are at the initial parameters (warmup from 0), step 2 is ~1e22.
  with pytest.raises(train.LossDivergedError, match=r"diverged between steps 2 and 3: mean loss "
                     r".* > divergence_factor 1000 x .*last good checkpoint: 2 in .*checkpoints"):
    _train(tmp_path / "run", 40, lr=1e10, log_every=1, checkpoint_every=1)
  assert _steps(tmp_path / "run") == [1, 2]  # the bad state is not saved
  assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]
  with pytest.raises(train.LossDivergedError, match=r"between steps 0 and 5: .*checkpoint: none"):
    _train(tmp_path / "scratch", 40, lr=1e10)
  assert _steps(tmp_path / "scratch") == []


@pytest.mark.slow  # compiles for seconds (fast tier: python -m pytest -m 'not slow')
def test_the_divergence_bound_is_the_factor_times_the_initial_loss(tmp_path):
  loss, params, batch_fn = _problem()
  rising = lambda p, b, r, s, f: (lambda l, m: (l * jax.numpy.where(s >= 20, 50.0, 1.0), m))(
      *loss(p, b, r, s, f))  # a loss that jumps 50x at step 20: above 10x, below 1000x
  state = train.train(rising, params, batch_fn, _cfg(30), str(tmp_path / "a"))
  assert int(state.step) == 30  # the default factor (1e3) lets a 50x rise pass
  # factor 10: fires at the jump, also after a resume (the reference is in the checkpoint)
  train.train(rising, params, batch_fn, _cfg(20, divergence_factor=10.0), str(tmp_path / "b"))
  with pytest.raises(train.LossDivergedError, match="between steps 20 and 25: .*checkpoint: 20"):
    train.train(rising, params, batch_fn, _cfg(30, divergence_factor=10.0), str(tmp_path / "b"))
  off = _train(tmp_path / "off", 20, lr=1e10, divergence_factor=0.0)  # 0 disables the guard
  assert int(off.step) == 20
  negative = lambda p, b, r, s, f: (lambda l, m: (l - 10.0, m))(*loss(p, b, r, s, f))
  state = train.train(negative, params, batch_fn, _cfg(10), str(tmp_path / "negative"))
  assert int(state.step) == 10  # a ratio bound means nothing for a reference <= 0: no check


def test_divergence_factor_is_validated():
  cfg = _cfg(10, divergence_factor=1e3)
  config_validation.validate_train(cfg, "teacher")
  config_validation.validate_train(_cfg(10), "teacher")  # sections without the field: default
  for bad in (-1.0, "big"):
    with pytest.raises(errors.ConfigError,
                       match=r"config.teacher.divergence_factor=.* allowed: a number >= 0"):
      config_validation.validate_train(ml_collections.ConfigDict(dict(cfg, divergence_factor=bad)),
                                       "teacher")


# ---------------------------------------------------------------------------------------------
# Storage faults: a full disk while a checkpoint is written.

_TENSORSTORE_ENOSPC = ValueError(  # the shape of a real full disk under orbax (a 100 kB tmpfs)
    'RESOURCE_EXHAUSTED: Error writing "ema_params.params.Dense_0.bias/0" in OCDBT database at '
    'local file "/w/checkpoints/30.orbax-checkpoint-tmp/": Failed writing: "/w/d/7908": Failed '
    "to write 1169065 bytes to file 19: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device", "/w/checkpoints/30"),
                                   _TENSORSTORE_ENOSPC], ids=["oserror", "tensorstore"])
def test_a_full_disk_while_saving_ends_in_one_message_and_resumes(tmp_path, monkeypatch, fault):
  """The save of step 30 fails as a full disk does (an OSError, or the ValueError orbax
  re-raises from tensorstore): one StorageError naming the run, the directory, the OS's reason and
  the step a re-run resumes from (20); the re-run, with space again, ends equal to an
  uninterrupted run."""
  full = _train(tmp_path / "full", 40)
  real_save = checkpoint.save

  def failing_save(manager, step, *args, **kwargs):
    if step == 30:
      raise fault
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", failing_save)
  with pytest.raises(train.StorageError, match=r"run: a write under .*run failed: .*No space "
                     r"left on device.*run the same command again; it resumes from step 20, "
                     r"the newest complete checkpoint"):
    _train(tmp_path / "run", 40)
  assert _steps(tmp_path / "run") == [10, 20]
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed = _train(tmp_path / "run", 40)
  assert _leaves_equal(resumed, full)
  assert _lines(tmp_path / "run") == _lines(tmp_path / "full")


def test_an_object_store_failing_for_a_while_or_for_long(tmp_path, monkeypatch):
  """On a gs:// workdir (tests/fake_gcs.py): two HTTP 503s on metrics writes are retried and the
  run equals one without faults; a store that stays down while step 30's rows are flushed (the
  try and its retries) ends in one StorageError naming the step a re-run resumes from (20), and
  the re-run, with the store back, equals the uninterrupted run."""
  import fake_gcs  # pylint: disable=g-import-not-at-top
  from mcm_jax import storage  # pylint: disable=g-import-not-at-top
  full = _train(tmp_path / "full", 40)
  fake_gcs.install(str(tmp_path / "gcs"), monkeypatch)
  monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0, 0))
  lines = lambda run: storage.read_text(f"gs://bucket/{run}/metrics.jsonl").splitlines()
  fake_gcs.fail("write", "flaky/metrics.jsonl", times=2, after=1)
  flaky = _train("gs://bucket/flaky", 40)
  assert fake_gcs.FAULTS[0][3] == 0  # both faults were hit
  assert _leaves_equal(flaky, full) and lines("flaky") == _lines(tmp_path / "full")
  fake_gcs.fail("write", "down/metrics.jsonl", times=3, after=2)  # the try and both retries
  with pytest.raises(train.StorageError, match=r"run: a write under gs://bucket/down failed: "
                     r"the object store did not answer \(HttpError: Service Unavailable\)\. "
                     r"Once the store answers, run the same command again; it resumes from "
                     r"step 20"):
    _train("gs://bucket/down", 40)
  fake_gcs.FAULTS.clear()
  resumed = _train("gs://bucket/down", 40)
  assert _leaves_equal(resumed, full) and lines("down") == _lines(tmp_path / "full")


def test_a_workdir_that_vanishes_during_a_save_is_named_and_a_rerun_starts_over(tmp_path,
                                                                                monkeypatch):
  """The workdir is deleted (an unmounted disk) just before step 30's save, while step 20's is
  still being written: one StorageError saying so, not a resume from a checkpoint that is gone;
  the same command then starts over and ends equal to an uninterrupted run."""
  full = _train(tmp_path / "full", 40)
  real_save = checkpoint.save

  def vanishing_save(manager, step, *args, **kwargs):
    if step == 30:  # moved away at once, as an unmount does (step 20's writes still open)
      os.rename(tmp_path / "run", tmp_path / "elsewhere")
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", vanishing_save)
  with pytest.raises(train.StorageError, match=r"run: the workdir .*run vanished while a "
                     r"checkpoint was written \(its step 10 is gone; .*\)\. Remount or restore it"):
    _train(tmp_path / "run", 40)
  monkeypatch.setattr(checkpoint, "save", real_save)
  assert _leaves_equal(_train(tmp_path / "run", 40), full)


def test_write_failures_are_told_from_other_errors():
  assert errors.write_failure(_TENSORSTORE_ENOSPC) == (
      "RESOURCE_EXHAUSTED, No space left on device [os_error_code='28']")
  assert "Read-only file system" in errors.write_failure(OSError(30, "Read-only file system"))
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(28, "No space left on device")
  assert "No space left" in errors.write_failure(wrapped)
  assert errors.write_failure(ValueError("shape mismatch")) is None
  assert errors.write_failure(FloatingPointError("nan")) is None
  # read errors and a device's out-of-memory are not failed writes
  assert errors.write_failure(FileNotFoundError(2, "No such file or directory", "/d/x")) is None
  assert errors.write_failure(PermissionError(13, "Permission denied", "/d/x")) is None
  assert errors.write_failure(RuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25.6GiB")) is None
  # an object store that did not answer (after storage's retries); a refusal is no such fault
  http = type("HttpError", (Exception,), {"code": 503})("Service Unavailable")
  assert errors.write_failure(http) == (
      "the object store did not answer (HttpError: Service Unavailable)")
  assert errors.unanswered_store(RuntimeError("save failed").with_traceback(None)) is False
  assert "TimeoutError" in errors.write_failure(TimeoutError("read timed out"))
  assert errors.write_failure(type("HttpError", (Exception,), {"code": 403})("Forbidden")) is None


@pytest.mark.parametrize("ending", ["abort", "watchdog"])
def test_supervisor_turns_a_lost_coordinator_into_one_line(ending, capfd, tmp_path):
  """A child that JAX stops for a lost coordinator: aborted (exit 134), or ended first by its own
  peer watchdog (exit 4) while JAX's abort handler writes its trace; the supervisor prints one
  line either way and exits ``EXIT_LOST_PEER``. Other endings pass through unchanged."""
  from mcm_jax import cli, peers, supervisor  # pylint: disable=g-import-not-at-top
  end = ("os.abort()" if ending == "abort" else
         f"print({peers.lost_peer_message(0, 2, 5, str(tmp_path))!r}, file=sys.stderr); "
         f"sys.exit({cli.EXIT_LOST_PEER})")
  child = ("import os, sys; print('training: process 1 of 2, 2 local devices', file=sys.stderr);"
           f" print('F1206 client.h:80] {supervisor.JAX_ABORT.decode()} ... absl::Status: "
           f"UNAVAILABLE: {supervisor.COORDINATOR_GONE.decode()}.', file=sys.stderr); "
           "print('*** stack trace ***', file=sys.stderr, flush=True); " + end)
  code = supervisor.run(str(tmp_path), [sys.executable, "-c", child])
  err = capfd.readouterr().err
  assert code == cli.EXIT_LOST_PEER
  assert err.rstrip().endswith(supervisor.lost_coordinator_message(2, str(tmp_path)))
  assert "stack trace" not in err and "no sign of it" not in err
  assert supervisor.run(str(tmp_path), [sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
