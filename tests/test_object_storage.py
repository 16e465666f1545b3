"""``--workdir=gs://...`` end to end, on a fake bucket (tests/fake_gcs.py: no network, no
appends, orbax's array data and metadata included). Every file a run writes must land in the
bucket and nothing under ``./gs:`` (where ``open`` / ``os.makedirs`` on the URL would put it)."""
import builtins
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

import fake_gcs
from mcm_jax import storage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(fake GCS root, cwd): gs://bucket/... is ``root/bucket/...``; the test runs in ``cwd``;
  ``open`` on a gs: path fails the test."""
  root = tmp_path / "gcs"
  fake_gcs.install(str(root), monkeypatch)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  real_open = builtins.open

  def guarded_open(file, *args, **kwargs):
    assert not str(file).startswith("gs:"), f"builtin open() on {file}"
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", guarded_open)
  yield root, cwd
  assert not (cwd / "gs:").exists(), "something wrote a local ./gs: directory"


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


def test_storage_primitives_on_the_bucket(bucket):
  root, _ = bucket
  storage.makedirs("gs://bucket/run/sub")
  storage.write_json("gs://bucket/run/a.json", {"x": 1})
  assert storage.read_json("gs://bucket/run/a.json") == {"x": 1}
  assert storage.isfile("gs://bucket/run/a.json") and not storage.isdir("gs://bucket/run/a.json")
  assert "a.json" in storage.listdir("gs://bucket/run")
  with pytest.raises(NotImplementedError):  # the fake is strict: no appends in an object store
    epath.Path("gs://bucket/run/log").open("a")
  log = storage.LineLog("gs://bucket/run/log.jsonl")
  log.append("1\n")
  log.append("2\n")
  assert not (root / "bucket/run/log.jsonl").exists()  # written whole on flush
  log.flush()
  assert (root / "bucket/run/log.jsonl").read_text() == "1\n2\n"
  log.replace(["2\n"])
  assert storage.LineLog("gs://bucket/run/log.jsonl").read_lines() == ["2\n"]
  storage.replace_text("gs://bucket/run/t.txt", "new")
  assert (root / "bucket/run/t.txt").read_text() == "new"
  local = storage.local_copy("gs://bucket/run/t.txt", str(root.parent / "cache"))
  assert open(local).read() == "new" and not local.startswith("gs:")


def test_transient_faults_are_retried_and_lasting_ones_raised(bucket, monkeypatch, caplog):
  """A 503, a timeout, a reset connection: retried after storage.RETRY_DELAYS_S, and the
  operation succeeds; a fault outlasting the retries, or one that is not transient (403), is
  raised; local files are not retried."""
  monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0, 0, 0))
  fake_gcs.fail("write", "run/a.json", times=2)
  storage.write_json("gs://bucket/run/a.json", {"x": 1})
  fake_gcs.fail("read", "run/a.json", error=TimeoutError("read timed out"))
  assert storage.read_json("gs://bucket/run/a.json") == {"x": 1}
  fake_gcs.fail("list", "bucket/run", error=ConnectionResetError(104, "Connection reset by peer"))
  assert storage.listdir("gs://bucket/run") == ["a.json"]
  fake_gcs.fail("read", "run/a.json", times=1)
  assert storage.local_copy("gs://bucket/run/a.json", str(bucket[0].parent / "cache"))
  assert len([r for r in caplog.records if "retrying in 0 s" in r.getMessage()]) == 5
  fake_gcs.fail("write", "run/b.json", times=4)  # the first try and three retries
  with pytest.raises(fake_gcs.HttpError, match="Service Unavailable"):
    storage.write_json("gs://bucket/run/b.json", {})
  assert not storage.exists("gs://bucket/run/b.json")
  fake_gcs.fail("read", "run/a.json", error=fake_gcs.HttpError(403, "Forbidden"))
  with pytest.raises(fake_gcs.HttpError, match="Forbidden"):
    storage.read_json("gs://bucket/run/a.json")  # not retried: the next read succeeds
  assert storage.read_json("gs://bucket/run/a.json") == {"x": 1}
  calls = []
  monkeypatch.setattr(epath.Path, "read_text", lambda self: calls.append(self) or (
      _ for _ in ()).throw(TimeoutError("slow disk")))
  with pytest.raises(TimeoutError):
    storage.read_text(str(bucket[0] / "local.txt"))
  assert len(calls) == 1  # a local path: no retries


@pytest.mark.slow  # two toy runs through the command line, in subprocesses
def test_toy_command_line_on_a_gs_workdir_and_resume(tmp_path):
  """The real CLI (`python -m mcm_jax.main` wiring) with --workdir=gs://...: config, metrics,
  checkpoints, results and figures in the bucket; the second invocation resumes from the
  bucket (no rows logged twice, config.json not duplicated)."""
  root, cwd = tmp_path / "gcs", tmp_path / "cwd"
  cwd.mkdir()
  cmd = [sys.executable, os.path.join(HERE, "fake_gcs.py"), str(root), "--",
         f"--config={ROOT}/configs/toy.py:tiny", "--workdir=gs://bucket/toy",
         "--config.fig1.enabled=False", "--config.sweep.methods=('cd_addim',)",
         "--config.sweep.student_steps=(1,)"]
  # every compiled program kept (not only those over 1 s to compile, a threshold that load moves)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  first = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  files = _files(root)
  run = "bucket/toy/"
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "samples.png"):
    assert run + name in files, (name, files)
  assert any(f.startswith(run + "teacher/checkpoints/") and f.endswith("manifest.ocdbt")
             for f in files)
  rows = (root / run / "metrics.jsonl").read_text().splitlines()
  assert rows and all(json.loads(r)["step"] >= 0 for r in rows)
  results = json.loads((root / run / "results.json").read_text())
  cache = {f for f in files if f.startswith(run + "compilation_cache/")}  # --compilation_cache
  assert cache, files  # auto: the run's compiled programs, in the bucket
  second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  # The same run from scratch beside the cache: every program it compiles is read from there.
  for path in (root / run).iterdir():
    if path.is_dir() and path.name != "compilation_cache":
      shutil.rmtree(path)
    elif not path.is_dir():
      path.unlink()
  cache = {f for f in _files(root) if f.startswith(run + "compilation_cache/")}
  third = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert third.returncode == 0, third.stderr[-3000:]
  again = {f for f in _files(root) if f.startswith(run + "compilation_cache/")}
  assert again == cache, again - cache  # nothing compiled anew
  assert json.loads((root / run / "results.json").read_text())["ring8"] == results["ring8"]
  assert (root / run / "metrics.jsonl").read_text().splitlines() == rows
  assert not (root / run / "config_1.json").exists()
  assert not (cwd / "gs:").exists() and os.listdir(cwd) == []


@pytest.mark.slow  # tiny UViT base training + eval, in process
def test_pixel_run_and_eval_on_a_gs_workdir(bucket):
  """Pixel training (x_var table, sample grids, samples.json) and --mode=eval (reference
  statistics, FD, eval grid and JSON) with everything in the bucket; a CD student reads its
  teacher from the bucket."""
  from configs import imagenet64_base, imagenet64_cd  # pylint: disable=g-import-not-at-top
  from mcm_jax.experiments import pixel  # pylint: disable=g-import-not-at-top
  root, _ = bucket
  config = imagenet64_base.get_config("tiny")
  config.train.steps = 4
  config.eval.update(num=16, reference_num=32, steps=(1,))
  pixel.run(config, "gs://bucket/base")
  result = pixel.evaluate(config, "gs://bucket/base")
  step = result["checkpoint_step"]
  files = _files(root / "bucket/base")
  for name in ("metrics.jsonl", "x_var_table.json", "samples.json", f"eval_step{step}.json",
               f"reference_{config.eval.features}.npz", f"eval_addim_1_step{step}.png"):
    assert name in files, (name, files)
  assert any(f.startswith("samples_") and f.endswith(f"_step{step}.png") for f in files), files
  assert np.isfinite(result["results"][0]["fd"])
  student = imagenet64_cd.get_config("tiny")
  student.init_from = "gs://bucket/base"
  student.train.steps = 2
  pixel.run(student, "gs://bucket/cd")
  assert (root / "bucket/cd/metrics.jsonl").stat().st_size > 0


@pytest.mark.slow  # a tiny MLCM stage from a trajectory bank, in process
def test_mlcm_bank_and_lora_export_on_a_gs_workdir(bucket, tmp_path, monkeypatch):
  """The trajectory bank is written to and read back from the bucket (through a local cache),
  the LoRA files are exported there and load from their gs:// path."""
  from configs import sdxl_mlcm  # pylint: disable=g-import-not-at-top
  from mcm_jax import lora  # pylint: disable=g-import-not-at-top
  from mcm_jax.data import trajectory_bank  # pylint: disable=g-import-not-at-top
  from mcm_jax.experiments import sdxl_mlcm as mlcm_experiment  # pylint: disable=g-import-not-at-top
  root, _ = bucket
  monkeypatch.setenv("MCM_JAX_BANK_CACHE", str(tmp_path / "cache"))
  config = sdxl_mlcm.get_config("tiny")
  config.mlcm.num_stages = 1
  config.mlcm.bank.update(dir="gs://bucket/bank", entries=8)
  config.train.steps = 2
  result = mlcm_experiment.run(config, "gs://bucket/mlcm")
  path = result["stages"][0]["lora"]
  assert path.startswith("gs://bucket/mlcm/stage0/lora/")
  files = _files(root / "bucket")
  for name in ("mlcm/stages.json", "mlcm/metrics.jsonl", "mlcm/stage0/lora/"
               "pytorch_lora_weights.safetensors", "mlcm/stage0/lora/mlcm_stage0_K4_kohya"
               ".safetensors", "bank/meta_p0000.json"):
    assert name in files, (name, files)
  bank = trajectory_bank.Bank("gs://bucket/bank", mlcm_experiment.bank_settings(config))
  assert len(bank) == 8 and np.all(np.isfinite(bank.get(np.arange(8))["z_tm"]))
  copies = _files(tmp_path / "cache")  # the shards were read through local copies
  assert copies and all(f.startswith("gs/bucket/bank/shard_p0000_") for f in copies), copies
  assert any(f.endswith("/z_tm.npy") for f in copies)
  params = mlcm_experiment.build_models(config)[1]
  remote = lora.load(path, params)
  local = lora.load(str(root / "bucket/mlcm/stage0/lora"), params)
  for k, ab in local.items():
    np.testing.assert_array_equal(remote[k]["a"], ab["a"])
