import os
import warnings

import jax

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Reuse compiled programs across test runs (much faster on 2 CPU cores).
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MCM_JAX_CACHE", os.path.expanduser("~/.cache/mcm_jax_jit")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
