"""Paged GQA decode attention: the Triton and Mosaic TPU kernels against the
plain-XLA reference (interpreted here, compiled with
MOELAB_KERNEL_TESTS_ON_DEVICE=1), the reference against float64 NumPy, both
kernels lowered for CUDA and TPU, and input validation.

Every case has rows of length 0, 1, one page, not a multiple of the page size
and the whole table; NaN in every cache slot that no row may read; block
tables in a random order with random entries past each row's pages.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.paged_attention import paged_attention, paged_attention_reference, resolve_impl

K, M = 2, 5  # kv heads, pages per row
# (G, E, dtype, S): group sizes 1, 2, 4, 8; head widths 64 and 128; both dtypes
CONFIGS = [(1, 64, "float32", 16), (2, 128, "bfloat16", 16), (4, 64, "bfloat16", 16),
           (8, 128, "float32", 8)]
TUNINGS = {"default": {}, "split": dict(pages_per_block=2, num_splits=2)}


def make_case(helpers, g, e, dtype, s, seed=0):
  lengths = [0, 1, s, 2 * s + 5, M * s]
  b, p = len(lengths), len(lengths) * M + 3
  tables, valid = helpers.page_layout(b, M, p, s, lengths, seed)
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, K * g, e))
  k_pages, v_pages = rng.standard_normal((2, K, p, s, e))
  k_pages[:, ~valid] = np.nan
  v_pages[:, ~valid] = np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(tables),
          jnp.asarray(lengths, jnp.int32))


def numpy_attention(helpers, q, k_pages, v_pages, tables, lengths, scale):
  """float64 NumPy: row by row, head by head, over the row's valid tokens only."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  b, h, e = q.shape
  k, _, s, _ = k_pages.shape
  o = np.zeros((b, h, e))
  for r, n in enumerate(np.asarray(lengths)):
    pages = np.asarray(tables)[r, :-(-n // s)]
    keys, values = (x[:, pages].reshape(k, -1, e)[:, :n] for x in (k_pages, v_pages))
    for head in range(h):
      kv = head // (h // k)
      o[r, head] = helpers.softmax_attend(scale * q[r, head][None] @ keys[kv].T, values[kv])[0]
  return o


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"G{c[0]}-E{c[1]}-{c[2]}-S{c[3]}")
def case(request, helpers):
  """(args, reference output as float32, tolerance) for one config."""
  g, e, dtype, s = request.param
  args = make_case(helpers, g, e, dtype, s)
  ref = np.asarray(paged_attention_reference(*args, scale=e ** -0.5), np.float32)
  return args, ref, helpers.tol[dtype]


def test_reference_equals_float64_numpy(case, helpers):
  args, ref, tol = case
  want = numpy_attention(helpers, *args, scale=args[0].shape[-1] ** -0.5)
  np.testing.assert_allclose(ref, want, rtol=tol, atol=tol)
  assert not ref[0].any()  # length 0


@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
def test_gpu_kernel_equals_reference(case, tuning, run_kernel):
  args, ref, tol = case
  out = run_kernel(paged_attention, "gpu", *args, **tuning)
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


def test_tpu_kernel_equals_reference(case, request, run_kernel):
  """One tuning per config (TPU interpret mode compiles slowly): default for G 1
  and 8, split for G 2 and 4."""
  args, ref, tol = case
  tuning = TUNINGS["default" if request.node.callspec.id.startswith(("G1", "G8")) else "split"]
  out = run_kernel(paged_attention, "tpu", *args, **tuning)
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


def test_tpu_kernel_with_eager_dmas(helpers, run_kernel):
  """DMAs done at start, not at wait: a prefetch into the slot being read would show."""
  args = make_case(helpers, 2, 64, "float32", 16, seed=1)
  ref = np.asarray(paged_attention_reference(*args))
  out = run_kernel(paged_attention, "tpu", *args, dma="eager", pages_per_block=1)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_custom_scale_and_auto(helpers):
  args = make_case(helpers, 4, 64, "float32", 16)
  want = numpy_attention(helpers, *args, scale=0.3)
  np.testing.assert_allclose(paged_attention(*args, scale=0.3), want, rtol=1e-5, atol=1e-5)
  assert resolve_impl("auto") == {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(),
                                                                  "reference")


@pytest.mark.parametrize("impl,platform,target", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                   ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("g,e,dtype", [(1, 64, jnp.float32), (8, 128, jnp.bfloat16),
                                       (3, 128, jnp.bfloat16)])
@pytest.mark.parametrize("tuning", [{}, dict(num_splits=4)], ids=["default", "split"])
def test_kernel_lowers_for_its_backend(impl, platform, target, g, e, dtype, tuning, helpers):
  """Lowering enforces what interpret mode does not (Triton: power-of-two
  tensors, supported ops; Mosaic: block tiling, scalar prefetch, DMA use)."""
  b, p, s = 4, 64, 16
  shapes = [jax.ShapeDtypeStruct(x, dtype) for x in ((b, K * g, e), (K, p, s, e), (K, p, s, e))]
  shapes += [jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)]
  f = functools.partial(paged_attention, impl=impl, **tuning)
  assert target in helpers.export_text(f, platform, shapes)


def good_args(**change):
  args = dict(q_BxHxE=jnp.zeros((2, 4, 64)), k_pages_KxPxSxE=jnp.zeros((2, 8, 16, 64)),
              v_pages_KxPxSxE=jnp.zeros((2, 8, 16, 64)),
              block_tables_BxM=jnp.zeros((2, 3), jnp.int32), lengths_B=jnp.ones((2,), jnp.int32))
  return {**args, **change}


@pytest.mark.parametrize("change,kw,match", [
    ({}, dict(impl="cuda"), "impl must be one of"),
    ({}, dict(pages_per_blok=2), "unknown tuning"),
    ({}, dict(num_splits=0), "num_splits must be a positive int"),
    ({}, dict(impl="gpu", num_splits=4), "num_splits=4 exceeds"),
    ({}, dict(scale=-1.0), "scale must be"),
    ({}, dict(impl="gpu", pages_per_block=3), "pages_per_block powers of two.*pages_per_block=3"),
    (dict(q_BxHxE=jnp.zeros((2, 3, 64))), {}, "must divide query heads"),
    (dict(q_BxHxE=jnp.zeros((2, 4, 32))), {}, "must be one \\[K, P, S, E\\] shape, E=32"),
    (dict(v_pages_KxPxSxE=jnp.zeros((2, 8, 8, 64))), {}, "must be one \\[K, P, S, E\\] shape"),
    (dict(q_BxHxE=jnp.zeros((2, 4, 64), jnp.bfloat16)), {}, "must share one dtype"),
    (dict(q_BxHxE=jnp.zeros((2, 4, 64), jnp.float16), k_pages_KxPxSxE=jnp.zeros(
        (2, 8, 16, 64), jnp.float16), v_pages_KxPxSxE=jnp.zeros((2, 8, 16, 64), jnp.float16)),
     {}, "float32 or bfloat16"),
    (dict(block_tables_BxM=jnp.zeros((3, 3), jnp.int32)), {}, "block_tables_BxM must be"),
    (dict(block_tables_BxM=jnp.zeros((2, 3))), {}, "must be int32"),
    (dict(lengths_B=jnp.ones((2,), jnp.int16)), {}, "lengths_B must be int32"),
    (dict(q_BxHxE=jnp.zeros((2, 4, 96)), k_pages_KxPxSxE=jnp.zeros((2, 8, 16, 96)),
          v_pages_KxPxSxE=jnp.zeros((2, 8, 16, 96))), dict(impl="gpu"), "E a power of two >= 16"),
    (dict(k_pages_KxPxSxE=jnp.zeros((2, 8, 12, 64)), v_pages_KxPxSxE=jnp.zeros((2, 8, 12, 64))),
     dict(impl="tpu"), "multiple of 8"),
])
def test_bad_input_raises_before_compiling(change, kw, match):
  with pytest.raises(ValueError, match=match):
    paged_attention(**good_args(**change), **kw)
