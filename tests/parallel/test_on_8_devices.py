"""Makes the tests of this directory run on 8 devices, never on fewer.

With 8 devices in this process they run right here (conftest.py kept them
collected); otherwise (conftest.py deselected them, or only this file was
selected) this test runs the directory in a subprocess whose XLA_FLAGS create
8 CPU devices.
"""

import os
import subprocess
import sys

import jax

from tests.parallel import conftest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_directory_runs_on_8_devices(request):
  siblings = [it for it in request.session.items
              if str(it.path).startswith(HERE + os.sep) and it.path != request.node.path
              and it.path.name not in conftest.OWN_PROCESSES]
  if jax.device_count() >= 8 and siblings:
    return  # they run in this process
  env = dict(os.environ, JAX_PLATFORMS="cpu",  # 8 CPU devices even on a 1-GPU host
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip())
  cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider",
         "--import-mode=importlib", "-m", request.config.getoption("markexpr") or "not slow",
         *(f"--ignore={os.path.join(HERE, m)}" for m in conftest.OWN_PROCESSES)]
  proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(HERE)), env=env,
                        capture_output=True, text=True, timeout=1500)
  tail = proc.stdout[-6000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, tail
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
