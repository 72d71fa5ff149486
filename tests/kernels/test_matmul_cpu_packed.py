"""The matrix kernel's packed 'km' weights (`matmul_cpu.pack_km`): the layout against its
plain-XLA reference and its inverse, and every product on a packed W bit for bit the
product on W itself (the same sums in the same order), over widths with a 16-column, a
narrower and no last block, odd K, 1-8 rows (a decode step, sums in registers) and more
(a prefill), float32 and bfloat16, any threads, and either bfloat16-pair unit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import backend as backend_lib
from kernels import matmul_cpu
from model.impl import ModelImpl

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="a CPU kernel: needs the CPU backend")

_matmul = jax.jit(matmul_cpu.matmul, static_argnames=(
    "transpose_w", "threads", "chunk_bytes", "out_dtype", "amx", "packed"))
WIDTHS = [96, 48, 71, 7]  # whole 32-column blocks; a 16-wide last block; 7 left over; no block


def problem(n, k, m, dtype, x_dtype, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, k)).astype(x_dtype)
  return x, (jax.random.normal(kw, (k, m)) / np.sqrt(k)).astype(dtype)


@pytest.mark.parametrize("m", WIDTHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layout_is_the_reference_and_unpacks(m, dtype):
  _, w = problem(1, 37, m, dtype, dtype)
  packed = matmul_cpu.pack_km(w, threads=3)
  np.testing.assert_array_equal(packed, matmul_cpu.pack_km_reference(w))
  np.testing.assert_array_equal(matmul_cpu.unpack_km(packed), w)
  if m >= 32:  # block 0 is W's first 32 columns, row after row (bfloat16: in row pairs)
    block = np.asarray(packed).reshape(-1)[:37 * 32]
    if dtype == jnp.bfloat16:
      np.testing.assert_array_equal(block[:36 * 32].reshape(18, 32, 2).transpose(0, 2, 1),
                                    np.asarray(w[:36, :32]).reshape(18, 2, 32))
      block = block[36 * 32:]
    np.testing.assert_array_equal(block.reshape(-1, 32), w[37 - block.size // 32:, :32])


@pytest.mark.parametrize("n", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("k,m", [(64, 96), (33, 48), (100, 71), (20, 7)])
@pytest.mark.parametrize("dtype,x_dtype", [(jnp.float32, jnp.float32),
                                           (jnp.bfloat16, jnp.float32),
                                           (jnp.bfloat16, jnp.bfloat16)],
                         ids=["f32", "bf16_w", "bf16_xw"])
def test_packed_product_is_the_unpacked_one(n, k, m, dtype, x_dtype):
  x, w = problem(n, k, m, dtype, x_dtype)
  want = _matmul(x, w, threads=1)
  p = matmul_cpu.pack_km(w)
  np.testing.assert_array_equal(_matmul(x, p, threads=1, packed=True), want)
  np.testing.assert_array_equal(_matmul(x, p, threads=3, chunk_bytes=1, packed=True), want)
  np.testing.assert_allclose(want, matmul_cpu.matmul_reference(x, w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 8, 17])
@pytest.mark.parametrize("k", [64, 71, 96])  # whole AMX k blocks, an odd tail, a half block
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "vdpbf16ps"])
def test_packed_bfloat16_pairs_on_either_unit(n, k, amx):
  x, w = problem(n, k, 80, jnp.bfloat16, jnp.bfloat16, seed=1)
  p = matmul_cpu.pack_km(w)
  np.testing.assert_array_equal(_matmul(x, p, threads=2, chunk_bytes=1, amx=amx, packed=True),
                                _matmul(x, w, threads=1, amx=amx))


def test_bfloat16_out_from_a_packed_weight():
  x, w = problem(5, 64, 96, jnp.bfloat16, jnp.bfloat16, seed=2)
  np.testing.assert_array_equal(
      _matmul(x, matmul_cpu.pack_km(w), out_dtype=jnp.bfloat16, packed=True),
      _matmul(x, w, out_dtype=jnp.bfloat16))


def test_rejects_a_packed_transposed_weight_and_other_layouts():
  x, w = problem(2, 8, 8, jnp.float32, jnp.float32)
  with pytest.raises(ValueError, match="packed=True takes a pack_km"):
    matmul_cpu.matmul(x, w, transpose_w=True, packed=True)
  with pytest.raises(ValueError, match="pack_km: a float32 or bfloat16"):
    matmul_cpu.pack_km(w.astype(jnp.float16))
  with pytest.raises(ValueError, match="impl.matmul_packed"):
    ModelImpl(matmul_packed=True)


def test_only_the_decode_loop_packs():
  impl = ModelImpl(matmul="cpu_kernel", matmul_threads=2)
  b = backend_lib.Backend(platform="cpu", impl=impl, num_devices=1)
  assert b.impl.matmul_packed is False and b.loop_impl().matmul_packed is True
  xla = dataclasses.replace(b, impl=ModelImpl())
  assert xla.loop_impl() == ModelImpl(rope_table=True)  # (the loops' RoPE table, on CPU)
  assert dataclasses.replace(xla, platform="gpu").loop_impl() == ModelImpl()
