"""The C++ CPU matrix kernel against its plain-XLA reference: both weight
layouts, float32 and bfloat16 weights, sizes that are not multiples of its
8-row passes, 32-column passes, 4-row tiles or 16-float vectors, and any
number of threads (chunk_bytes=1 splits a product's output columns into
chunks of 32 columns of W, 'km', or 4 rows, 'mk'); bfloat16 x with bfloat16 W
takes the VDPBF16PS pairs where the CPU has AVX512-BF16, and the AMX tiles
where it has AMX-BF16 (the same cases, each unit forced)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import matmul_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="a CPU kernel: needs the CPU backend")

SHAPES = [(1, 576, 200), (8, 64, 37), (5, 7, 130), (17, 100, 45)]


def problem(n, k, m, transpose_w, dtype, seed=0, x_dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, k)).astype(x_dtype)
  w = (jax.random.normal(kw, (m, k) if transpose_w else (k, m)) / np.sqrt(k)).astype(dtype)
  return x, w


_matmul = jax.jit(matmul_cpu.matmul,
                  static_argnames=("transpose_w", "threads", "chunk_bytes", "out_dtype", "amx"))
AMX = "amx" in matmul_cpu.bf16_units()


def test_builds_on_cpu():
  """The kernel compiles here (a C++ compiler is part of the CPU setup)."""
  assert matmul_cpu.available(), matmul_cpu.build_error()


@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype,x_dtype", [(jnp.float32, jnp.float32),
                                           (jnp.bfloat16, jnp.float32),
                                           (jnp.bfloat16, jnp.bfloat16)],  # bf16 pairs
                         ids=["f32", "bf16_w", "bf16_xw"])
def test_equals_reference_and_is_independent_of_threads(n, k, m, transpose_w, dtype, x_dtype):
  x, w = problem(n, k, m, transpose_w, dtype, x_dtype=x_dtype)
  want = matmul_cpu.matmul_reference(x, w, transpose_w)
  one = _matmul(x, w, transpose_w=transpose_w, threads=1, chunk_bytes=1)
  np.testing.assert_allclose(one, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(_matmul(x, w, transpose_w=transpose_w), want, rtol=2e-5, atol=2e-5)
  # Every sum in one order, whichever chunks and threads ran it.
  np.testing.assert_array_equal(_matmul(x, w, transpose_w=transpose_w, threads=3, chunk_bytes=1),
                                one)
  np.testing.assert_array_equal(_matmul(x, w, transpose_w=transpose_w, threads=2), one)


@pytest.mark.parametrize("n,k,m", [(2, 576, 200), (17, 100, 45), (40, 70, 300), (3, 33, 16)])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "vdpbf16ps"])
def test_bfloat16_pairs_on_either_unit(n, k, m, transpose_w, amx):
  """Both pair units, forced (each falls back to the next where the CPU lacks it): the
  reference, and one order of every sum whatever the chunks; tails of k (16 pairs a
  tile row), of columns (16 a tile) and of rows (16 a tile) included."""
  x, w = problem(n, k, m, transpose_w, jnp.bfloat16, seed=4, x_dtype=jnp.bfloat16)
  want = matmul_cpu.matmul_reference(x, w, transpose_w)
  one = _matmul(x, w, transpose_w=transpose_w, threads=1, chunk_bytes=1, amx=amx)
  np.testing.assert_allclose(one, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(
      _matmul(x, w, transpose_w=transpose_w, threads=2, amx=amx), one)


@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX-BF16 (and the OS's permission)")
def test_amx_by_default_from_two_rows():
  """amx=None: the tiles for 2+ rows, VDPBF16PS for one (their sums differ in order)."""
  x, w = problem(8, 576, 300, False, jnp.bfloat16, seed=5, x_dtype=jnp.bfloat16)
  tiles = _matmul(x, w, amx=True)
  pairs = _matmul(x, w, amx=False)
  assert not np.array_equal(tiles, pairs)  # the two orders differ somewhere
  np.testing.assert_array_equal(_matmul(x, w), tiles)
  np.testing.assert_array_equal(_matmul(x[:1], w), pairs[:1])


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("x_dtype,amx", [(jnp.float32, None), (jnp.bfloat16, True),
                                         (jnp.bfloat16, False)], ids=["f32", "amx", "vdp"])
def test_a_row_does_not_depend_on_the_other_rows(transpose_w, x_dtype, amx):
  """Row r of a 9-row product equals the 1-row product of row r, bit for bit, on one unit."""
  x, w = problem(9, 70, 90, transpose_w, jnp.bfloat16, seed=1, x_dtype=x_dtype)
  rows = _matmul(x, w, transpose_w=transpose_w, threads=2, chunk_bytes=1, amx=amx)
  for r in (0, 4, 8):
    np.testing.assert_array_equal(
        rows[r], _matmul(x[r:r + 1], w, transpose_w=transpose_w, threads=1, chunk_bytes=1,
                         amx=amx)[0])


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bfloat16_out_is_the_float32_out_rounded(transpose_w):
  """Bit for bit XLA's convert (nearest even), NaN and infinities included, any chunks."""
  x, w = problem(5, 40, 70, transpose_w, jnp.bfloat16, seed=3, x_dtype=jnp.bfloat16)
  w = w.at[(slice(None), 0) if not transpose_w else (0, slice(None))].set(jnp.nan)
  w = w.at[(slice(None), 1) if not transpose_w else (1, slice(None))].set(jnp.inf)
  x = x * 300.0  # sums with low bits to round
  want = _matmul(x, w, transpose_w=transpose_w).astype(jnp.bfloat16)
  for threads, chunk in ((1, 1), (2, 1 << 19), (3, 1)):
    got = _matmul(x, w, transpose_w=transpose_w, threads=threads, chunk_bytes=chunk,
                  out_dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))


def test_reference_is_the_float64_product():
  x, w = problem(4, 33, 21, False, jnp.bfloat16, seed=2)
  want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(matmul_cpu.matmul_reference(x, w), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(matmul_cpu.matmul_reference(x, w.T, transpose_w=True), want,
                             rtol=1e-5, atol=1e-5)


def test_inside_while_loop_and_vmap():
  """As a decode step uses it (inside a loop), and batched by vmap (sequential)."""
  x, w = problem(4, 48, 48, False, jnp.float32, seed=3)
  step = lambda f: lambda i, y: y + 0.1 * f(y, w)
  loop = lambda f: jax.jit(lambda y: jax.lax.fori_loop(0, 3, step(f), y))
  np.testing.assert_allclose(
      loop(lambda y, w: matmul_cpu.matmul(y, w, threads=2, chunk_bytes=1))(x),
      loop(matmul_cpu.matmul_reference)(x), rtol=1e-5, atol=1e-5)
  xs = jnp.stack([x, 2 * x])
  np.testing.assert_allclose(jax.vmap(lambda x: matmul_cpu.matmul(x, w, threads=2))(xs),
                             jax.vmap(lambda x: matmul_cpu.matmul_reference(x, w))(xs),
                             rtol=1e-5, atol=1e-5)


def test_rejects_other_weight_dtypes_and_mismatched_sizes():
  x, w = problem(2, 8, 4, False, jnp.float32)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    matmul_cpu.matmul(x, w.astype(jnp.float16))
  with pytest.raises(ValueError, match="contraction"):
    matmul_cpu.matmul(x, w, transpose_w=True)
