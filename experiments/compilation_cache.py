"""JAX's persistent compilation cache for the command-line tools.

A second `generate` or `train` of the same shapes loads its executables from
disk instead of compiling them again. The cache is on by default under
`~/.cache/moelab/jax`; `--compilation_cache=DIR` moves it and
`--compilation_cache=none` turns it off. Tests set JAX_COMPILATION_CACHE_DIR
themselves (tests/conftest.py), which the default leaves alone.
"""

import os

from absl import flags

DEFAULT = os.path.join("~", ".cache", "moelab", "jax")

_DIR = flags.DEFINE_string(
    "compilation_cache", None,
    f"JAX persistent compilation cache directory; 'none' disables it (default "
    f"$JAX_COMPILATION_CACHE_DIR, else {DEFAULT}).")


def enable(path: str | None = None) -> str | None:
  """Points jax at the cache directory (flag, env, default); returns it or None."""
  import jax  # noqa: PLC0415  (after the host-device flags are set)
  path = path or _DIR.value or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT
  if path.lower() == "none":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every executable: decode loops compile in seconds, not minutes.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
