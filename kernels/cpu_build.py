"""Builds a C++ XLA-FFI CPU kernel on first use and registers its handlers.

    lib = CppKernel("matmul_cpu.cc", {"moelab_matmul": "Matmul"})
    lib.available(), lib.build_error()

The source beside this file is compiled with the system C++ compiler
(`$CXX`, else `c++`) against jaxlib's FFI headers into
`$MOELAB_KERNEL_CACHE` (default `~/.cache/moelab`), keyed by a hash of the
source and the headers beside it that it includes, the compiler and flags, the jaxlib version and the CPU's feature
flags (it is built with -march=native), so a second process loads the cached
library. Without a compiler, or when the build fails, `available()` is
False and `build_error()` says why; callers then run their XLA reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile

import jax
import jaxlib

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@functools.cache
def last_level_cache_bytes() -> int:
  """Size of this CPU's last-level cache (Linux sysfs; 32 MiB where it does not say)."""
  caches = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
  sizes = []
  for index in caches.glob("index*"):
    try:
      text = (index / "size").read_text().strip()
    except OSError:
      continue
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    sizes.append(int(text.rstrip("KMG")) * unit)
  return max(sizes, default=32 << 20)


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "moelab"
  return pathlib.Path(os.environ.get("MOELAB_KERNEL_CACHE", default))


def cpu_flags() -> bytes:
  """This CPU's feature flags (-march=native builds are only valid on such a CPU)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith(b"flags")), b"")
  except OSError:
    return platform.processor().encode()


def local_sources(source: pathlib.Path) -> list[pathlib.Path]:
  """`source` and the headers beside it that it includes (`#include "x.h"`), recursively:
  what the build's cache key hashes."""
  found, todo = [], [source]
  while todo:
    f = todo.pop()
    if f in found:
      continue
    found.append(f)
    for name in re.findall(r'^#include "([^"]+)"', f.read_text(), re.M):
      if (source.parent / name).exists():
        todo.append(source.parent / name)
  return found


class CppKernel:
  """One C++ source of `kernels/` and its FFI handlers {target name: symbol},
  compiled with `flags` (default FLAGS)."""

  def __init__(self, source: str, targets: dict[str, str], flags: tuple[str, ...] = FLAGS):
    self.source = pathlib.Path(__file__).with_name(source)
    self.targets = dict(targets)
    self.flags = tuple(flags)
    self._error = ""

  @functools.cached_property
  def library(self) -> ctypes.CDLL | None:
    """Builds (once per source, flags, jaxlib and CPU), loads and registers;
    None if there is no compiler or the build fails."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
      self._error = "no C++ compiler ($CXX or c++ on PATH)"
      return None
    key = hashlib.sha256(b"".join(f.read_bytes() for f in local_sources(self.source))
                         + " ".join(self.flags).encode() + cxx.encode()
                         + jaxlib.__version__.encode() + cpu_flags()).hexdigest()[:16]
    lib = cache_dir() / f"{self.source.stem}_{key}.so"
    try:
      if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # atomic: parallel builds race
          out = pathlib.Path(tmp) / lib.name
          cmd = [cxx, *self.flags, f"-I{jax.ffi.include_dir()}", str(self.source), "-o",
                 str(out)]
          run = subprocess.run(cmd, capture_output=True, text=True)
          if run.returncode != 0:
            self._error = f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}"
            return None
          os.replace(out, lib)
    except OSError as e:
      self._error = f"cannot write {lib} ({e}); set MOELAB_KERNEL_CACHE"
      return None
    so = ctypes.CDLL(str(lib))
    for target, symbol in self.targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(so, symbol)),
                                  platform="cpu")
    return so

  def build_error(self) -> str:
    """Why the kernel is not available ('' if it is)."""
    return "" if self.library is not None else self._error

  def available(self) -> bool:
    """Whether it can run: the CPU backend and a built library."""
    return jax.default_backend() == "cpu" and self.library is not None
