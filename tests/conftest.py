"""Suite-wide setup: a persistent XLA compilation cache for this test session.

Many tests compile the same tiny programs (a train step per run in the
resume test, the same model in several tests); the cache turns repeats into
loads. It lives in a fresh temporary directory per session (subprocesses
inherit it through the environment), so nothing stale carries across runs.
"""

import os
import tempfile

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               tempfile.mkdtemp(prefix="moelab-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
