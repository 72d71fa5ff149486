"""Suite-wide setup: a persistent XLA compilation cache for this test session.

Many tests compile the same tiny programs (a train step per run in the
resume test, the same model in several tests); the cache turns repeats into
loads. It lives in a fresh temporary directory per session (pytest-xdist
workers and subprocesses inherit it through the environment), so nothing
stale carries across runs; the process that made it removes it at the end.

The suite's programs are tiny, so XLA's LLVM optimisation dominates their cost:
tests compile with --xla_backend_optimization_level=0 (less LLVM optimisation of
the generated code; about 20% less wall time measured on 2 cores) unless
XLA_FLAGS already chooses a level. Users' runs keep XLA's default.

Fixture `corpus`: a tiny local text corpus (tests make their own data).
"""

import os
import shutil
import tempfile

import pytest

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moelab-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  """Removes the session's compilation cache (about 30 MB) if this process made it."""
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def corpus(tmp_path):
  """Glob of 12 small Python-like text files (about 15 kB) under tmp_path."""
  d = tmp_path / "corpus"
  d.mkdir()
  for i in range(12):
    (d / f"f{i:02d}.txt").write_text(
        "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
  return str(d / "*.txt")
