"""Eight fake CPU devices for the multi-device tests in this directory.

XLA reads `--xla_force_host_platform_device_count` when jax starts its CPU
backend, so the flag is added here when jax has not been imported yet, which is
the case for `python -m pytest tests/parallel`. In a full run (`python -m
pytest`, as in .ci/run) test modules collected earlier have already imported
jax with one device; then this directory's tests are deselected in-process and
`test_on_8_devices.py` re-runs the directory in a subprocess with the flag set.
Either way these tests run on 8 devices, never silently on one.
"""

import os
import sys

NUM_DEVICES = 8
XLA_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
RUNNER = "test_on_8_devices.py"
# Modules that start their own processes and need no devices in this one.
OWN_PROCESSES = ("test_multihost.py",)

if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAG}".strip()

import jax  # noqa: E402  (after the flag)

HERE = os.path.dirname(os.path.abspath(__file__))


def enough_devices() -> bool:
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
