"""Top-k SwiGLU experts of a decode step as a CPU kernel (XLA FFI, C++).

    y[n] = sum_j gate[n, j] * SwiGLU_{expert[n, j]}(x[n])          (Shazeer 2017 eq. 1,
    SwiGLU_e(x) = (silu(x W_in[e][:, :F]) * x W_in[e][:, F:]) W_out[e]  top-k gates)

`moe_ffn` reads every chosen expert once, in place in the stacked weights,
for all of its rows, split over the threads of XLA's intra-op pool
(`kernels/moe_cpu.cc` explains the split). XLA:CPU itself either reads an
expert once per row or packs (copies) it for a product with several rows;
a decode step, bound by reading expert weights, is what this speeds up.
`moe_ffn_reference` is the same computation in plain XLA, the one the
kernel is tested against.

The C++ source is compiled on first use with the system C++ compiler
(`$CXX`, else `c++`) against jaxlib's FFI headers into
`$MOELAB_KERNEL_CACHE` (default `~/.cache/moelab`), keyed by a hash of
the source, the compiler and flags, the jaxlib version and the CPU's
feature flags (it is built with -march=native). `available()` says whether
that worked (`build_error()` why not); callers fall back to XLA when it
did not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "moelab_moe_ffn"
_SOURCE = pathlib.Path(__file__).with_name("moe_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "moelab"
  return pathlib.Path(os.environ.get("MOELAB_KERNEL_CACHE", default))


def _cpu_flags() -> bytes:
  """This CPU's feature flags (-march=native builds are only valid on such a CPU)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith(b"flags")), b"")
  except OSError:
    return platform.processor().encode()


_BUILD_ERROR = ""  # why the last build failed, for error messages


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
  """Builds (once per source, flags, jaxlib and CPU) and loads the kernel;
  None if there is no compiler or the build fails (`_BUILD_ERROR` says why)."""
  global _BUILD_ERROR
  cxx = shutil.which(os.environ.get("CXX", "c++"))
  if cxx is None:
    _BUILD_ERROR = "no C++ compiler ($CXX or c++ on PATH)"
    return None
  key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + cxx.encode()
                       + jaxlib.__version__.encode() + _cpu_flags()).hexdigest()[:16]
  lib = _cache_dir() / f"moe_cpu_{key}.so"
  try:
    if not lib.exists():
      lib.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # atomic: parallel builds race
        out = pathlib.Path(tmp) / lib.name
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
          _BUILD_ERROR = f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}"
          return None
        os.replace(out, lib)
  except OSError as e:
    _BUILD_ERROR = f"cannot write {lib} ({e}); set MOELAB_KERNEL_CACHE"
    return None
  so = ctypes.CDLL(str(lib))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(so.MoeFfn), platform="cpu")
  return so


def build_error() -> str:
  """Why the kernel is not available ('' if it is or was not tried)."""
  _library()
  return _BUILD_ERROR


def available() -> bool:
  """Whether `moe_ffn` can run: a CPU backend and a built kernel."""
  return jax.default_backend() == "cpu" and _library() is not None


def moe_ffn(x_NxD, expert_NxA, gate_NxA, w_in_XxDx2F, w_out_XxFxD, threads: int = 1):
  """y_NxD (see the module docstring); float32 only.

  threads: threads of XLA's intra-op pool that share every expert's read
  (each streams 1/threads of it).
  """
  if not available():
    raise RuntimeError(f"moe_cpu kernel unavailable: {build_error() or 'not the CPU backend'}")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x_NxD.astype(jnp.float32), expert_NxA.astype(jnp.int32),
              gate_NxA.astype(jnp.float32), w_in_XxDx2F, w_out_XxFxD, threads=np.int64(threads))


def moe_ffn_reference(x_NxD, expert_NxA, gate_NxA, w_in_XxDx2F, w_out_XxFxD):
  """Plain XLA: every (row, choice) through its expert, gate-weighted sum."""
  h_NxAx2F = jnp.einsum("nd,nkdf->nkf", x_NxD, w_in_XxDx2F[expert_NxA])
  g, u = jnp.split(h_NxAx2F, 2, axis=-1)
  y_NxAxD = jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(g) * u, w_out_XxFxD[expert_NxA])
  return jnp.einsum("nk,nkd->nd", gate_NxA.astype(y_NxAxD.dtype), y_NxAxD)
