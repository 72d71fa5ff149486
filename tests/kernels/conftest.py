"""Shared by the paged-attention kernel tests: paged caches with NaN in every
slot no row may read, and a runner that puts a kernel in the right mode.

Off-device (CI) both Pallas kernels run interpreted: Triton in Pallas's
interpreter, Mosaic TPU in TPU interpret mode with uninitialised memory set
to NaN and the race detector on. With MOELAB_KERNEL_TESTS_ON_DEVICE=1 the
kernel of the machine's backend runs compiled instead (`experiments/gpu_check.sh`
sets it); the other one stays interpreted, on the CPU.
"""

import contextlib
import os
import types

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

ON_DEVICE = os.environ.get("MOELAB_KERNEL_TESTS_ON_DEVICE") == "1"
DEVICE_IMPL = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend())
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def pytest_configure(config):
  del config
  if ON_DEVICE and DEVICE_IMPL is None:
    raise pytest.UsageError("MOELAB_KERNEL_TESTS_ON_DEVICE=1 needs a GPU or TPU backend; "
                            f"jax has {jax.default_backend()!r}")


def tpu_races_found():
  """Whether TPU interpret mode's race detector flagged the last kernel run."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  return bool(interpret_pallas_call.races is not None and interpret_pallas_call.races.races_found)


@pytest.fixture(scope="session")
def run_kernel():
  """run_kernel(fn, impl, *args, dma="on_wait", **kw): fn(*args, impl=impl, interpret=..., **kw)
  as a NumPy array; for the interpreted TPU kernel, asserts that no race was found."""

  def run(fn, impl, *args, dma="on_wait", **kw):
    if ON_DEVICE and impl == DEVICE_IMPL:
      return np.asarray(fn(*args, impl=impl, interpret=False, **kw))
    interpret = True
    if impl == "tpu":
      interpret = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True,
                                        dma_execution_mode=dma)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu) if DEVICE_IMPL else contextlib.nullcontext():
      out = np.asarray(fn(*jax.device_put(args, cpu), impl=impl, interpret=interpret, **kw))
    if impl == "tpu":
      assert not tpu_races_found(), "TPU interpret mode detected a race"
    return out

  return run


@pytest.fixture(scope="session")
def helpers():
  """page_layout, softmax_attend, export_text, TOL (by dtype name) for the test modules."""
  return types.SimpleNamespace(page_layout=page_layout, softmax_attend=softmax_attend,
                               export_text=export_text, tol=TOL)


def export_text(f, platform, shapes):
  """StableHLO text of jax.jit(f) exported for `platform` ("cuda" or "tpu") from here.

  Triton's custom call has no serialization guarantee, so that check is off;
  jax >= 0.11 lowers Triton for the GPU of an abstract mesh (an H100 here)."""
  target = contextlib.nullcontext()
  if platform == "cuda" and hasattr(jax.sharding, "AbstractDevice"):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    target = jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device))
  skip = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with target:
    return jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=skip)(
        *shapes).mlir_module()


def page_layout(rows, pages_per_row, num_pages, page_size, lengths, seed):
  """(block_tables_BxM, valid_PxS): a row's first ceil(length / S) entries are distinct
  pages in a random order (non-contiguous, some pages belong to no row), the
  entries after them random pages (any row's, or none's); valid marks the slots
  that hold a token below some row's length."""
  rng = np.random.default_rng(seed)
  tables = rng.permutation(num_pages)[:rows * pages_per_row].reshape(rows, pages_per_row)
  valid = np.zeros((num_pages, page_size), bool)
  for r, n in enumerate(lengths):
    used = -(-n // page_size)
    tables[r, used:] = rng.integers(0, num_pages, pages_per_row - used)
    for t in range(n):
      valid[tables[r, t // page_size], t % page_size] = True
  return tables.astype(np.int32), valid


def softmax_attend(s_HxT, v_TxW):
  """float64 softmax(s) v over T; zeros for T = 0."""
  if s_HxT.shape[-1] == 0:
    return np.zeros((s_HxT.shape[0], v_TxW.shape[-1]))
  p = np.exp(s_HxT - s_HxT.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v_TxW
