"""Test session setup: 8 fake CPU devices, the persistent compilation cache, Flax's parameter
shape check memoized (``memoized_param_check``), the ``slow`` and ``tpu_compile`` markers, and
session-scoped fixtures that write the tiny PyTorch-side checkpoints once per session.

Fast tier: ``python -m pytest -q -m "not slow" tests``; everything: ``python -m pytest -q tests``.
Shared fixtures are read-only: a test that needs a modified copy copies it first
(``shutil.copytree``) into its own ``tmp_path`` (``tiny_sdxl_dir`` checks at the end of the
session that no file in it changed). torch / transformers / diffusers are imported
inside the fixtures (after ``pytest.importorskip``), never when a test module is imported."""
import os
import types
import warnings

# 8 fake CPU devices for the sharding tests; set before jax is imported. Unsharded code runs on
# device 0 as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# The tests (and the processes they start, which inherit XLA_FLAGS: helpers.xla_flags) compile
# with XLA's backend optimisation off. Their tiny models' programs run for milliseconds and
# compile for seconds; the unoptimised code computes the same function (XLA:CPU uses no fast
# math either way) and the suite needs about a fifth less CPU time. Runs outside the tests keep
# XLA's default.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# CPU only: libtpu (in the test extra, for tests/test_plan.py's abstract TPU topologies) would
# otherwise make every JAX process, subprocesses included, probe for a TPU and take its lock.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Reuse compiled programs across test runs (much faster on 2 CPU cores). Every program is kept,
# also the small per-primitive ones of eager (un-jitted) code, e.g. a model's init or a loss
# written out by hand: compiling those again costs seconds per test module, reading them ~1 s.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MCM_JAX_CACHE", os.path.expanduser("~/.cache/mcm_jax_jit")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order

import memoized_param_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order
import sdxl_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-order

# Flax's per-apply parameter shape check, each initialiser's shapes traced once per session.
memoized_param_check.install()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end runs (toy / pixel / MLCM experiments, generation), long "
      "trainings, PyTorch-equivalence tests taking seconds; -m 'not slow' is the fast tier")
  config.addinivalue_line(
      "markers", "tpu_compile: compiles a train step for an abstract TPU topology (libtpu, "
      "tests/test_plan.py); slow too")


# The modules that take longest, in that order, run first: pytest-xdist (--dist loadfile) hands
# whole modules to its workers in collection order, so the short ones are left to fill the end.
LONGEST_FIRST = ("test_multiprocess.py", "test_plan.py", "test_mlcm_run.py", "test_pixel.py",
                 "test_object_storage.py", "test_toy_e2e.py", "test_generate.py",
                 "test_controlnet.py",
                 "test_sdxl_unet.py", "test_wiring.py", "test_uvit.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-module order kept


def _snapshot(path):
  """(relative path, size, mtime) of every file under ``path``."""
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def _require(*modules):
  """Skips the test when a PyTorch-side package (the ``test`` extra) is not installed."""
  for name in modules:
    pytest.importorskip(name)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
  """A whole tiny SDXL directory (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/; PyTorch
  safetensors, seed 0), written once per session. Read-only: copy it to modify it."""
  _require("torch", "diffusers", "transformers")
  path = sdxl_fixtures.write_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))
  before = _snapshot(path)
  yield path
  assert _snapshot(path) == before, "a test modified the shared tiny_sdxl_dir: copy it first"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
  """A tiny CLIP vision tower with projection (``dir/clip``) and a LAION-layout aesthetic head
  (``dir/head.pth``), written once: namespace(dir, clip, head) with the PyTorch modules."""
  _require("torch", "transformers")
  path = tmp_path_factory.mktemp("tiny_clip")
  clip, head = sdxl_fixtures.tiny_clip_and_head(path)
  return types.SimpleNamespace(dir=path, clip=clip, head=head)


@pytest.fixture(scope="session")
def tiny_clip_model(tmp_path_factory):
  """A whole tiny CLIP model (text + vision, ``dir/clip`` with a tokenizer) and an aesthetic head
  (``dir/head.pth``), written once: namespace(dir, clip, tokenizer, head)."""
  _require("torch", "transformers")
  path = tmp_path_factory.mktemp("tiny_clip_model")
  clip, tokenizer, head = sdxl_fixtures.tiny_clip_model_and_head(path)
  return types.SimpleNamespace(dir=path, clip=clip, tokenizer=tokenizer, head=head)


@pytest.fixture(scope="session")
def tiny_imagereward(tmp_path_factory):
  """A tiny random ImageReward directory (``sdxl_fixtures.write_tiny_imagereward``), written once:
  namespace(dir, score) with ``score`` its PyTorch reference."""
  _require("torch", "transformers")
  path = tmp_path_factory.mktemp("tiny_imagereward")
  return types.SimpleNamespace(dir=path, score=sdxl_fixtures.write_tiny_imagereward(path))
