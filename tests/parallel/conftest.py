"""Eight fake CPU devices for the multi-device tests in this directory.

XLA reads `--xla_force_host_platform_device_count` when jax starts its CPU
backend, so the flag is added (in `pytest_configure`, before any test module
imports jax) when every path given to pytest lies in this directory, as in
`python -m pytest tests/parallel`. Otherwise the other tests keep their one
device: this directory's tests are deselected in-process and
`test_on_8_devices.py` re-runs the directory in a subprocess with the flag
set (a full run as in .ci/run, or `pytest tests/train tests/parallel`).
Either way these tests run on 8 devices, never silently on one.
"""

import os
import sys

NUM_DEVICES = 8
XLA_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
RUNNER = "test_on_8_devices.py"
# Modules that start their own processes and need no devices in this one.
OWN_PROCESSES = ("test_multihost.py",)
HERE = os.path.dirname(os.path.abspath(__file__))


def _inside(arg: str) -> bool:
  path = os.path.abspath(arg.split("::")[0])
  return path == HERE or path.startswith(HERE + os.sep)


def pytest_configure(config):
  if config.args and all(_inside(str(a)) for a in config.args) and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG}".strip()


def enough_devices() -> bool:
  import jax  # after pytest_configure has set the flag (or decided not to)
  return jax.device_count() >= NUM_DEVICES


def pytest_collection_modifyitems(config, items):
  if enough_devices():
    return
  moved = [it for it in items
           if str(it.path).startswith(HERE + os.sep)
           and it.path.name not in (RUNNER, *OWN_PROCESSES)]
  if moved:
    config.hook.pytest_deselected(items=moved)
    items[:] = [it for it in items if it not in moved]
  # The runner is the suite's longest item (the whole directory, ~5 min). It
  # goes first, so that under `pytest -n 2` one worker waits on its
  # subprocess while the other runs the rest, instead of it starting last.
  items.sort(key=lambda it: it.path.name != RUNNER)  # stable: the rest keep their order
