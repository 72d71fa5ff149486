"""The C++ CPU paged decode-attention kernel against its plain-XLA reference, and the
reference against float64 NumPy.

Every case has rows of length 0, 1, one page, not a multiple of the page size and
the whole table; NaN in every slot no row may read; block tables in a random order
with random entries past each row's pages; head widths that are and are not
multiples of the kernel's 16-float vectors and wider than one group of 8 of them,
values narrower than keys (MLA), pages longer than the kernel's 32-token blocks, and
1 to 8 query heads a kv head. The contiguous-cache form (layout [B, T, K, E]) is
checked the same way, and bfloat16 caches (as bfloat16 or as their bits in uint16)
against the float32 kernel.
"""

import jax
import numpy as np
import pytest

from kernels import paged_attention_cpu as pac

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="a CPU kernel: needs the CPU backend")
K, M = 2, 5  # kv heads, pages per row


def make_case(helpers, g, ek, ev, s, seed=0):
  lengths = [0, 1, s, 2 * s + 3, M * s]
  b, p = len(lengths), len(lengths) * M + 3
  tables, valid = helpers.page_layout(b, M, p, s, lengths, seed)
  rng = np.random.default_rng(seed)
  k_pages = rng.standard_normal((K, p, s, ek)).astype(np.float32)
  v_pages = rng.standard_normal((K, p, s, ev)).astype(np.float32)
  k_pages[:, ~valid] = np.nan
  v_pages[:, ~valid] = np.nan
  q = rng.standard_normal((b, K * g, ek)).astype(np.float32)
  k_new = rng.standard_normal((b, K, ek)).astype(np.float32)
  v_new = rng.standard_normal((b, K, ev)).astype(np.float32)
  return q, k_pages, v_pages, tables, np.asarray(lengths, np.int32), k_new, v_new


def numpy_attention(helpers, q, k_pages, v_pages, tables, lengths, k_new, v_new, scale):
  """float64, row by row and head by head: the row's valid tokens, then its new one."""
  b, h, _ = q.shape
  k, _, s, _ = k_pages.shape
  o = np.zeros((b, h, v_pages.shape[-1]))
  for r, n in enumerate(lengths):
    pages = tables[r, :-(-n // s)] if n else tables[r, :0]
    keys, values = (x[:, pages].reshape(k, -1, x.shape[-1])[:, :n].astype(np.float64)
                    for x in (k_pages, v_pages))
    for head in range(h):
      kv = head // (h // k)
      ks = np.concatenate([keys[kv], k_new[r, kv][None]])
      vs = np.concatenate([values[kv], v_new[r, kv][None]])
      o[r, head] = helpers.softmax_attend(scale * q[r, head][None].astype(np.float64) @ ks.T,
                                          vs)[0]
  return o


def test_builds_on_cpu():
  """The kernel compiles here (a C++ compiler is part of the CPU setup)."""
  assert pac.available(), pac.build_error()


@pytest.mark.parametrize("g,ek,ev,s", [(1, 8, 8, 4), (2, 32, 32, 16), (4, 20, 12, 8),
                                       (3, 64, 64, 4), (2, 144, 136, 48), (5, 64, 48, 16),
                                       (8, 128, 128, 40)])
def test_equals_reference_and_float64(helpers, g, ek, ev, s):
  case = make_case(helpers, g, ek, ev, s)
  want = numpy_attention(helpers, *case, scale=ek ** -0.5)
  ref = pac.paged_decode_attention_reference(*case)
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
  for threads in (1, 3):
    got = jax.jit(pac.paged_decode_attention, static_argnames="threads")(*case, threads=threads)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 8.0])
def test_custom_scale(helpers, scale):
  """8.0: scores of +-100 and more, so most weights underflow to 0 (the exp's clamp)."""
  case = make_case(helpers, 2, 16, 16, 40, seed=1)
  want = numpy_attention(helpers, *case, scale=scale)
  np.testing.assert_allclose(pac.paged_decode_attention(*case, scale=scale), want,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g,ek,ev,t", [(3, 64, 64, 11), (4, 20, 12, 11), (3, 64, 64, 75)])
def test_contiguous_layout_equals_float64(helpers, g, ek, ev, t):
  """The [B, T, K, E] cache: row b reads slots < lengths[b] (NaN past them) and its new key."""
  lengths = np.asarray([0, 1, 7, t], np.int32)
  b = len(lengths)
  rng = np.random.default_rng(2)
  k_c = rng.standard_normal((b, t, K, ek)).astype(np.float32)
  v_c = rng.standard_normal((b, t, K, ev)).astype(np.float32)
  for r, n in enumerate(lengths):
    k_c[r, n:], v_c[r, n:] = np.nan, np.nan
  q = rng.standard_normal((b, K * g, ek)).astype(np.float32)
  k_new = rng.standard_normal((b, K, ek)).astype(np.float32)
  v_new = rng.standard_normal((b, K, ev)).astype(np.float32)
  # The same cache as pools of one page of t slots per row: [K, B, t, E], table [B, 1].
  as_pages = lambda x: np.ascontiguousarray(x.transpose(2, 0, 1, 3))
  table = np.arange(b, dtype=np.int32)[:, None]
  want = numpy_attention(helpers, q, as_pages(k_c), as_pages(v_c), table, lengths, k_new,
                         v_new, scale=ek ** -0.5)
  for threads in (1, 3):
    got = jax.jit(pac.contiguous_decode_attention, static_argnames="threads")(
        q, k_c, v_c, lengths, k_new, v_new, threads=threads)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got16 = pac.contiguous_decode_attention(q.astype(jax.numpy.bfloat16), k_c, v_c, lengths,
                                          k_new, v_new)
  assert got16.dtype == jax.numpy.bfloat16


def test_bfloat16_step_tensors_equal_their_float32_widening(helpers):
  """q, k_new, v_new all bfloat16: read as such, o rounded in the kernel (nearest even)
  to the float32 kernel's result on the same (widened) values, bit for bit."""
  bf16 = jax.numpy.bfloat16
  q, k_pages, v_pages, tables, lengths, k_new, v_new = make_case(helpers, 3, 64, 40, 48, seed=4)
  q16, kn16, vn16 = (jax.numpy.asarray(x, bf16) for x in (q, k_new, v_new))
  want = pac.paged_decode_attention(q16.astype(np.float32), k_pages, v_pages, tables, lengths,
                                    kn16.astype(np.float32), vn16.astype(np.float32))
  got = pac.paged_decode_attention(q16, k_pages, v_pages, tables, lengths, kn16, vn16)
  assert want.dtype == np.float32 and got.dtype == bf16
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                np.asarray(want.astype(bf16)).view(np.uint16))
  mixed = pac.paged_decode_attention(q16, k_pages, v_pages, tables, lengths, k_new, v_new)
  assert mixed.dtype == np.float32  # not all bfloat16: all widened


@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_bfloat16_caches_equal_their_float32_widening(helpers, layout):
  """A bfloat16 cache, given as bfloat16 or as its bits in uint16 (model/kv_cache.py's
  BF16_BITS), is widened on read: the float32 kernel's result on the widened cache, for
  float32 and for bfloat16 step tensors (to float32 rounding: -ffast-math lets the
  compiler order the sums of the widths past the last 16-float vector differently)."""
  bf16 = jax.numpy.bfloat16
  q, k_pages, v_pages, tables, lengths, k_new, v_new = make_case(helpers, 3, 64, 40, 48, seed=5)
  if layout == "contiguous":  # each row's pages in order: a [B, M S, K, E] cache
    k_pages, v_pages = (np.ascontiguousarray(
        x[:, tables].reshape(K, len(lengths), -1, x.shape[-1]).transpose(1, 2, 0, 3))
        for x in (k_pages, v_pages))
    attend = lambda q, k, v, kn, vn: pac.contiguous_decode_attention(q, k, v, lengths, kn, vn)
  else:
    attend = lambda q, k, v, kn, vn: pac.paged_decode_attention(q, k, v, tables, lengths, kn, vn)
  k16, v16 = (jax.numpy.asarray(x, bf16) for x in (k_pages, v_pages))
  bits = lambda x: jax.lax.bitcast_convert_type(x, jax.numpy.uint16)
  for step in (np.float32, bf16):
    qs, kn, vn = (jax.numpy.asarray(x, step) for x in (q, k_new, v_new))
    want = np.asarray(attend(qs, k16.astype(np.float32), v16.astype(np.float32), kn, vn))
    assert not np.isnan(want).any()
    for k, v in ((k16, v16), (bits(k16), bits(v16))):
      got = attend(qs, k, v, kn, vn)
      assert got.dtype == step
      np.testing.assert_allclose(np.asarray(got, np.float32), want.astype(np.float32),
                                 rtol=1e-6 if step == np.float32 else 8e-3, atol=1e-7)
