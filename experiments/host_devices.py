"""CPU host devices for a script: call `request` before jax is imported.

XLA's CPU backend has one device unless `--xla_force_host_platform_device_count`
is in XLA_FLAGS when jax starts. Scripts that split work over devices (expert
parallelism in bench_moe, row-parallel decoding in decode/data_parallel.py)
read their device count from their own command line here, before absl parses
flags, because by then jax has started.
"""

import os
import sys


def flag_value(flag: str, default: int) -> int:
  """The integer given as `--<flag>=N` on the command line, else `default`."""
  return int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{flag}=")),
                  default))


def request(flag: str, default: int) -> int:
  """Adds the host device count given as `--<flag>=N` (else `default`) to XLA_FLAGS.

  Returns N. Does nothing but return N when jax is already imported or
  XLA_FLAGS already sets a count.
  """
  n = flag_value(flag, default)
  flags = os.environ.get("XLA_FLAGS", "")
  if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  return n
