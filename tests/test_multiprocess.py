"""The multi-host paths with real processes: two JAX processes x 2 CPU devices on this machine,
started as ``launch/slurm_gpu.sh`` starts them (``python -m mcm_jax.main --multihost``, with
``jax.distributed.initialize`` reading SLURM's variables, set here by hand as ``srun`` would),
against the same job in one process.

What runs across processes: each process reads only its slice of every batch, gradients are
reduced over the processes' devices (CPU collectives), orbax writes one checkpoint from both,
the damaged-checkpoint fallback agrees on one step, ``--mode=eval`` gathers the samples of
both processes (``process_allgather``) before its Frechet distance, a SIGTERM to one process
stops both at one step, and a process whose peer is killed stops with one line
(``mcm_jax.peers``)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers  # tests/
from configs import imagenet64_base, imagenet64_cd
from mcm_jax import peers, supervisor
from mcm_jax.experiments import pixel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 2,
             "sample.x_var_data": 64, "eval.num": 16, "eval.reference_num": 32,
             "eval.steps": (1,)}


def _free_slurm_job_id():
  """A SLURM_JOB_ID whose coordinator port (jax: 61440 + id % 4096) is free here."""
  for job in np.random.default_rng().permutation(4096):
    with socket.socket() as s:
      try:
        s.bind(("localhost", 61440 + int(job)))
        return str(job)
      except OSError:
        continue
  raise RuntimeError("no free port in 61440..65535")


def _start(workdir, *flags, overrides=None, config="configs/imagenet64_base.py:tiny"):
  """``main --multihost`` started in two processes of 2 CPU devices each (``overrides`` on top
  of ``OVERRIDES`` for the pixel config, alone for another)."""
  job = _free_slurm_job_id()
  base = OVERRIDES if config.startswith("configs/imagenet64_base.py") else {}
  overrides = [f"--config.{k}={v}" for k, v in dict(base, **(overrides or {})).items()]
  procs = []
  for i in range(2):
    env = dict(os.environ, SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_PLATFORMS="cpu",
               XLA_FLAGS=helpers.xla_flags(2))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "mcm_jax.main", "--multihost",
         f"--compilation_cache={jax.config.jax_compilation_cache_dir}",  # the suite's
         f"--config={config}", f"--workdir={workdir}", *overrides, *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _logs(procs, timeout=400):
  """Each process's output once it has exited; a hung peer does not outlive the test."""
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()


def _two_processes(workdir, *flags, **kwargs):
  """``main --multihost`` in two processes of 2 CPU devices each; returns their logs."""
  procs = _start(workdir, *flags, **kwargs)
  logs = _logs(procs)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


SRUN = """#!/usr/bin/env python3
# srun on one machine: the command as SLURM_NTASKS tasks, each with SLURM's per-task variables.
import os, subprocess, sys
command = sys.argv[1:]
while command[0].startswith("--"):  # srun's own options
  command.pop(0)
tasks = [subprocess.Popen(command, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
         for i in range(int(os.environ["SLURM_NTASKS"]))]
codes = [t.wait() for t in tasks]
sys.exit(next((c for c in codes if c), 0))
"""


def _slurm_gpu_script(tmp_path, workdir):
  """``launch/slurm_gpu.sh`` as sbatch would run it on one node with two tasks (srun stood in
  for by ``SRUN``); returns its output."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(SRUN)
  (bin_dir / "srun").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=_free_slurm_job_id(),
             SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS=helpers.xla_flags(2))
  done = subprocess.run(
      ["bash", "launch/slurm_gpu.sh", "configs/imagenet64_base.py:tiny", workdir,
       f"--compilation_cache={jax.config.jax_compilation_cache_dir}",
       *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stderr


def _truncate_latest_arrays(workdir):
  """Damage the last checkpoint (step 4): its array files cut in half."""
  data = os.path.join(workdir, "checkpoints", "4", "state", "d")
  for name in os.listdir(data):
    path = os.path.join(data, name)
    os.truncate(path, os.path.getsize(path) // 2)


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _config(module, overrides):
  config = module.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
  """The tiny pixel base trained in one process (this one's 8 devices) and through
  ``launch/slurm_gpu.sh`` in two: (config, one's workdir, two's workdir, the script's log).
  Read-only: copy a workdir to change it."""
  tmp_path = tmp_path_factory.mktemp("base")
  config = _config(imagenet64_base, OVERRIDES)
  pixel.run(config, str(tmp_path / "one"))
  log = _slurm_gpu_script(tmp_path, str(tmp_path / "two"))  # as on a SLURM cluster
  return config, str(tmp_path / "one"), str(tmp_path / "two"), log


@pytest.mark.slow  # two 2-process runs (start-up and compile in each process) and one in-process
def test_two_processes_train_fall_back_and_evaluate_as_one(base_runs, tmp_path):
  """Trained through ``launch/slurm_gpu.sh``; evaluated after a damaged latest checkpoint."""
  config, one, two, log = base_runs
  assert "process 1 of 2, 2 local / 4 global devices" in log
  want, got = _rows(one), _rows(two)
  assert [r["step"] for r in got] == [2, 4]
  for w, g in zip(want, got):  # the same batches and updates; only reduction order differs
    np.testing.assert_allclose(g["base/loss"], w["base/loss"], rtol=1e-5)
    np.testing.assert_allclose(g["base/grad_norm"], w["base/grad_norm"], rtol=1e-4)
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]

  # The latest checkpoint damaged: both processes fall back to step 2 and evaluate it.
  one, two = shutil.copytree(one, tmp_path / "one"), shutil.copytree(two, tmp_path / "two")
  _truncate_latest_arrays(one)
  _truncate_latest_arrays(two)
  want = pixel.evaluate(config, one)
  logs = _two_processes(two, "--mode=eval")
  for log in logs:
    assert "checkpoints/4 cannot be read" in log and "reading step 2" in log, log[-3000:]
  got = json.load(open(os.path.join(two, "eval_step2.json")))
  assert want["checkpoint_step"] == got["checkpoint_step"] == 2
  assert len(got["results"]) == len(want["results"]) == 1
  np.testing.assert_allclose(got["results"][0]["fd"], want["results"][0]["fd"], rtol=1e-3)


@pytest.mark.slow  # a 2-process MLCM stage and the same stage in-process
def test_two_processes_build_one_trajectory_bank_and_stream_it(tmp_path):
  """MLCM stage 0 from a trajectory bank: each process writes the pairs of its own batch rows
  (its shards and ``meta_p<i>.json``), both wait for each other's, then both stream the whole
  bank; its entries equal the bank one process builds."""
  from configs import sdxl_mlcm  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import trajectory_bank  # pylint: disable=g-import-not-at-top
  from mcm_jax.experiments import sdxl_mlcm as experiment  # pylint: disable=g-import-not-at-top
  overrides = {"mlcm.num_stages": 1, "mlcm.bank.entries": 16, "train.steps": 2,
               "sample.num": 1}
  config = sdxl_mlcm.get_config("tiny")
  config.update_from_flattened_dict(dict(overrides, **{"mlcm.bank.dir": str(tmp_path / "bank1")}))
  experiment.run(config, str(tmp_path / "one"))
  _two_processes(str(tmp_path / "two"), config="configs/sdxl_mlcm.py:tiny",
                 overrides=dict(overrides, **{"mlcm.bank.dir": str(tmp_path / "bank2")}))
  assert sorted(f for f in os.listdir(tmp_path / "bank2") if f.startswith("meta")) == [
      "meta_p0000.json", "meta_p0001.json"]
  settings = experiment.bank_settings(config)
  one = trajectory_bank.Bank(str(tmp_path / "bank1"), settings)
  two = trajectory_bank.Bank(str(tmp_path / "bank2"), settings)
  assert len(one) == len(two) == 16
  by_prompt = lambda bank: bank.get(np.argsort(bank.get(np.arange(16))["prompt_index"] * 1000
                                               + bank.get(np.arange(16))["t_m"], kind="stable"))
  a, b = by_prompt(one), by_prompt(two)  # the same pairs, stored in another shard order
  for k in ("prompt_index", "segment", "t_m", "t_n", "seg_start"):
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  for k in ("z_tm", "z_tn"):  # float32 rounding of other device splits, amplified by w = 8
    assert np.abs(b[k] - a[k]).max() < 3e-5 * np.abs(a[k]).max(), k
  rows = _rows(str(tmp_path / "two"))
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["mlcm_stage0_K4/loss"])
                                                    for r in rows)


def _wait_for_training(procs, workdir, after=0):
  """Until ``metrics.jsonl`` holds a row past step ``after`` (both processes are stepping)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and any(
      json.loads(l)["step"] > after for l in open(metrics) if l.strip())):
    assert time.monotonic() < deadline and procs[0].poll() is None, _logs(procs)[0][-3000:]
    time.sleep(0.5)


@pytest.mark.slow  # a 2-process CD run stopped by SIGTERM, resumed, one process killed; in-process
def test_sigterm_stops_both_at_one_step_and_a_killed_peer_is_named(base_runs, tmp_path):
  """Consistency distillation from the 2-process base, in two processes. Preemption of one host:
  both processes save the same step and exit 143 (the flag is or'ed over the processes each
  logged chunk, ``train.on_any_process``). The same command again resumes both from that step;
  then SIGKILL of process 1 (an OOM kill, a lost node): process 0, blocked in the step's
  collectives, stops within the peer timeout with exit 4 and one line naming the lost process
  and how to resume (``mcm_jax.peers``), not JAX's abort after its heartbeat timeout; then, run
  again, SIGKILL of process 0: process 1 stops at once with exit 4 and one line
  (``mcm_jax.supervisor``). Every logged step, before and after the resumes, equals an
  uninterrupted one-process run."""
  workdir = str(tmp_path / "run")
  long = dict(OVERRIDES, **{"train.steps": 10_000, "train.checkpoint_every": 1000,
                            "init_from": base_runs[2]})
  cd = "configs/imagenet64_cd.py:tiny"
  procs = _start(workdir, overrides=long, config=cd)
  _wait_for_training(procs, workdir)
  procs[1].send_signal(signal.SIGTERM)
  logs = _logs(procs, timeout=120)
  assert [p.returncode for p in procs] == [143, 143], logs[0][-2000:] + logs[1][-2000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and saved[0] % 2 == 0 and 0 < saved[0] < 1000
  assert all(f"SIGTERM at step {saved[0]}" in log for log in logs)

  procs = _start(workdir, "--peer_timeout=5", overrides=long, config=cd)  # from saved[0]
  _wait_for_training(procs, workdir, after=saved[0])
  rows = _rows(workdir)
  assert [r["step"] for r in rows][:saved[0] // 2 + 1] == list(range(2, saved[0] + 3, 2))
  procs[1].kill()
  killed = time.monotonic()
  log = _logs(procs[:1], timeout=60)[0]
  assert procs[0].returncode == peers.EXIT_LOST_PEER, log[-3000:]
  assert time.monotonic() - killed < 30
  assert f"resumed from step {saved[0]}" in log
  assert peers.lost_peer_message(1, 2, 5, workdir) in log
  assert "Check failure stack trace" not in log and "Fatal Python error" not in log

  # SIGKILL of process 0, which holds JAX's coordination service: JAX aborts process 1 at once;
  # its supervisor (mcm_jax.supervisor) turns that into one line and exit 4.
  logged = _rows(workdir)[-1]["step"]  # the killed run's last row
  procs = _start(workdir, "--peer_timeout=5", overrides=long, config=cd)  # from saved[0] again
  _wait_for_training(procs, workdir, after=logged)
  procs[0].kill()
  killed = time.monotonic()
  log = _logs(procs[1:], timeout=60)[0]
  assert procs[1].returncode == peers.EXIT_LOST_PEER, log[-3000:]
  assert time.monotonic() - killed < 30
  assert log.rstrip().endswith(supervisor.lost_coordinator_message(2, workdir)), log[-3000:]
  assert "Check failure stack trace" not in log
  rows = _rows(workdir)
  assert rows[-1]["step"] > saved[0]
  one = str(tmp_path / "one")
  pixel.run(_config(imagenet64_cd, dict(long, **{"train.steps": rows[-1]["step"]})), one)
  for w, g in zip(_rows(one), rows, strict=True):  # the same batches, noise and updates
    assert w["step"] == g["step"]
    np.testing.assert_allclose(g["cd/loss"], w["cd/loss"], rtol=1e-5)
