"""Time from a restart to the first training step, with and without the persistent compilation
cache (``python -m mcm_jax.main --compilation_cache``). Prints one JSON line per run.

python benchmarks/restart.py [--runs digits,small] [--out /tmp/restart]

Each run is a real preemption: ``python -m mcm_jax.main`` trains (logging every step,
checkpointing every few) until its first checkpoint, then gets SIGTERM (it saves and exits).
The same command is started again twice, each time measured from launch until its first new
metrics row (the first step after the restore) and then stopped with SIGTERM: once with
``--compilation_cache=''`` and once with the cache the first process filled.
- 'digits': the tiny UViT base on the digits (configs/imagenet64_base.py:tiny);
- 'small': the paper's small UViT at 64x64 (configs/imagenet64_base.py:small) on the digits
  upsampled to 64x64, batch 2, float32 (CPU).
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "digits": ["--config=configs/imagenet64_base.py:tiny", "--config.train.steps=100000"],
    "small": ["--config=configs/imagenet64_base.py:small", "--config.data.name=digits",
              "--config.data.channels=1", "--config.data.num_classes=10",
              "--config.train.batch_size=2", "--config.model.dtype=float32",
              "--config.mesh.fsdp=1", "--config.train.steps=100000"],
}
COMMON = ["--config.train.log_every=1", "--config.train.checkpoint_every=2",
          "--config.sample.every=0"]


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith("\n"))


def _checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def run_until(cmd, until, timeout=3600):
  """Starts ``cmd``; returns seconds until ``until()`` holds, then SIGTERMs it and waits."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    while not until():
      if proc.poll() is not None:
        raise RuntimeError(f"{cmd} ended early:\n{proc.stderr.read().decode()[-3000:]}")
      if time.perf_counter() - t0 > timeout:
        raise TimeoutError(cmd)
      time.sleep(0.05)
    seconds = time.perf_counter() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    return seconds
  finally:
    proc.kill()


def measure(name, out):
  workdir, cache = os.path.join(out, name), os.path.join(out, name + "_cache")
  for path in (workdir, cache):
    shutil.rmtree(path, ignore_errors=True)
  cmd = [sys.executable, "-m", "mcm_jax.main", f"--workdir={workdir}"] + RUNS[name] + COMMON
  first = run_until(cmd + [f"--compilation_cache={cache}"],
                    lambda: _checkpoints(workdir) and _rows(workdir) > _checkpoints(workdir)[0])
  result = {"run": name, "first_start_s": round(first, 1),
            "cache_files": len(os.listdir(cache)),
            "cache_mb": round(sum(os.path.getsize(os.path.join(cache, f))
                                  for f in os.listdir(cache)) / 2 ** 20, 1)}
  for label, flag in (("restart_no_cache_s", ""), ("restart_cache_s", cache)):
    rows = _rows(workdir)
    result[label] = round(run_until(cmd + [f"--compilation_cache={flag}"],
                                    lambda r=rows: _rows(workdir) > r), 1)
  result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.node()}"
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="digits")
  parser.add_argument("--out", default="/tmp/restart")
  args = parser.parse_args()
  for name in args.runs.split(","):
    print(json.dumps(measure(name, args.out)), flush=True)


if __name__ == "__main__":
  main()
