"""Suite-wide setup: a persistent XLA compilation cache for this test session.

Many tests compile the same tiny programs (a train step per run in the
resume test, the same model in several tests); the cache turns repeats into
loads. It lives in a fresh temporary directory per session (pytest-xdist
workers and subprocesses inherit it through the environment), so nothing
stale carries across runs; the process that made it removes it at the end.

The suite's programs are tiny, so compiling them dominates their cost: tests
compile with TEST_XLA_FLAGS (each unless XLA_FLAGS already sets it, and only if
this jaxlib knows it). Users' runs keep XLA's defaults.

Fixture `corpus`: a tiny local text corpus (tests make their own data).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Compile time, not run time, dominates the suite (tiny programs, ~1500 compiles per
# few test files, most of them eager ops at 30-60 ms each): less LLVM optimisation,
# and XLA:CPU's older loop emitters, which compile a small module about 40% faster
# than its fusion emitters (docs/performance.md, "Suite time").
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moelab-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")



def _with_flags(flags) -> str:
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def _xla_flags_known(flags) -> bool:
  """Whether this jaxlib's XLA accepts `flags` in XLA_FLAGS (an unknown one aborts)."""
  env = dict(os.environ, XLA_FLAGS=_with_flags(flags), JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, timeout=120)
  return probe.returncode == 0


# xdist workers and subprocesses inherit the result through XLA_FLAGS (no probe there).
_NEW_FLAGS = [f for f in TEST_XLA_FLAGS
              if f.split("=")[0].lstrip("-") not in os.environ.get("XLA_FLAGS", "")]
if _NEW_FLAGS:
  _known = (_NEW_FLAGS if _xla_flags_known(_NEW_FLAGS)
            else [f for f in _NEW_FLAGS if _xla_flags_known([f])])
  os.environ["XLA_FLAGS"] = _with_flags(_known)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The loop emitters cannot update a buffer in place inside a fusion, so the tests of
# in-place cache updates compile their programs with XLA's default emitters, as
# users' runs do: `lowered.compile(USER_XLA_OPTIONS)`.
USER_XLA_OPTIONS = ({"xla_cpu_use_fusion_emitters": True}
                    if "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"] else None)


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
