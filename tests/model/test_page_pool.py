"""The paged cache's allocator under random grow / fork / free sequences (hypothesis).

Every row writes a value of its own at each position; a host model of what every row
must read back (forks inherit their parent's tokens) is compared with the pool after
every operation, so a page handed to two owners, a shared page written in place or
freed while still referenced shows up as a wrong value; the free stack and the
reference counts are checked against the block table at the same time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import page_pool
from model.config import ModelConfig
from model.paged_cache import PagedSpec

CFG = ModelConfig(vocab_size=8, d_model=4, num_layers=1, num_heads=1, num_kv_heads=1,
                  ffn_dim=8, head_dim=2)
B, S, M = 4, 2, 5  # rows, page size, pages per row


def check_pool(cache):
  """Reference counts == block-table entries per page; the stack holds the others once."""
  table = np.asarray(cache.table_BxM)
  p = cache.pool.num_pages
  counts = np.bincount(table[table < p].ravel(), minlength=p)
  refs = np.asarray(cache.pool.refs_P)
  np.testing.assert_array_equal(refs, counts)
  top = int(cache.pool.top)
  stack = np.asarray(cache.pool.free_P)[:top]
  assert len(set(stack.tolist())) == top, "a page is on the free stack twice"
  assert set(stack.tolist()) == set(np.flatnonzero(counts == 0).tolist())
  np.testing.assert_array_equal(np.asarray(page_pool.free_mask(cache.pool)), counts == 0)


def read_rows(cache, lengths):
  """Row b's values at positions < lengths[b], read through its block table (None: lost)."""
  pages = np.asarray(cache.layers[0].k_pages_KxPxSxE)[0, :, :, 0]
  table = np.asarray(cache.table_BxM)
  out = []
  for b, n in enumerate(lengths):
    out.append([pages[table[b, t // S], t % S] if table[b, t // S] < pages.shape[0] else None
                for t in range(n)])
  return out


@jax.jit
def grow(cache, positions_BxL, values_BxL):
  cache = cache.reserve(positions_BxL)
  kv = jnp.broadcast_to(values_BxL[:, :, None, None], values_BxL.shape + (1, 2))
  return cache.update(0, kv, kv, positions_BxL)


reorder = jax.jit(lambda cache, rows: cache.reorder(rows))
release = jax.jit(lambda cache, rows: cache.release(rows))

OPS = st.one_of(
    st.tuples(st.just("grow"), st.integers(1, 3)),
    st.tuples(st.just("fork"), st.lists(st.integers(0, B - 1), min_size=B, max_size=B)),
    st.tuples(st.just("free"), st.lists(st.booleans(), min_size=B, max_size=B)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=25), num_pages=st.sampled_from([6, 12]))
def test_random_grow_fork_free_never_leaks_or_shares_a_written_page(ops, num_pages):
  cache = PagedSpec(page_size=S, num_pages=num_pages).init(CFG, B, M * S)
  want = [[] for _ in range(B)]  # what each row must read back; None: released
  next_value = 1.0
  for op, arg in ops:
    if op == "grow":
      live = [b for b in range(B) if want[b] is not None and len(want[b]) + arg <= M * S]
      if not live:
        continue
      pos = np.zeros((B, arg), np.int32)
      vals = np.zeros((B, arg), np.float32)
      for b in range(B):
        start = len(want[b]) if b in live else M * S  # past the table: writes nothing
        pos[b] = start + np.arange(arg)
        vals[b] = next_value + np.arange(arg)
        next_value += arg
      cache = grow(cache, pos, vals)
      for b in live:
        want[b] = want[b] + list(vals[b])
      if bool(cache.pool.exhausted):  # a claim found no page: it took every page there was
        assert int(cache.pool.top) == 0
        check_pool(cache)
        got = read_rows(cache, [len(w or []) for w in want])
        for b in range(B):  # what a row could not store is lost, nothing else changes
          assert all(g is None or g == w for g, w in zip(got[b], want[b] or []))
        return
    elif op == "fork":
      rows = np.array([p if want[p] is not None else b for b, p in enumerate(arg)], np.int32)
      cache = reorder(cache, rows)
      want = [list(want[r]) if want[r] is not None else None for r in rows]
    else:
      cache = release(cache, np.array(arg))
      want = [None if f else w for f, w in zip(arg, want)]
    check_pool(cache)
    got = read_rows(cache, [len(w or []) for w in want])
    for b in range(B):
      assert got[b] == (want[b] or []), (op, b)
    for b in range(B):
      if want[b] is None:
        assert int(cache.limit_B[b]) == 0 and (np.asarray(cache.table_BxM)[b] == num_pages).all()


def test_claim_pops_in_order_and_flags_exhaustion():
  pool = page_pool.new_pool(3)
  pool, pages = page_pool.claim(pool, jnp.array([True, False, True]))
  assert pages.tolist() == [0, 3, 1] and int(pool.top) == 1 and not bool(pool.exhausted)
  pool, pages = page_pool.claim(pool, jnp.array([True, True]))
  assert pages.tolist() == [2, 3] and int(pool.top) == 0 and bool(pool.exhausted)
  pool = page_pool.add_refs(pool, jnp.array([1, 1, 3]), jnp.array([1, -1, -1]))
  assert int(pool.top) == 0  # page 1: +1 - 1, still held; 3 is NULL_PAGE
  pool = page_pool.add_refs(pool, jnp.array([1, 0]), -1)
  assert sorted(np.asarray(pool.free_P)[:int(pool.top)].tolist()) == [0, 1]


def test_empty_pool_is_refused():
  with pytest.raises(ValueError, match="num_pages"):
    page_pool.new_pool(0)
