import os
import warnings

# 8 fake CPU devices for the sharding tests; set before jax is imported. Unsharded code runs on
# device 0 as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Reuse compiled programs across test runs (much faster on 2 CPU cores).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MCM_JAX_CACHE", os.path.expanduser("~/.cache/mcm_jax_jit")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
