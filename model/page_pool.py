"""The page allocator of the paged KV cache: a free-page stack with reference counts, in jit.

PagedAttention (Kwon et al. 2023, arXiv 2309.06180 §4.2-4.3) keeps a row's keys and
values in fixed-size pages listed by its block table, so memory is claimed a page at a
time as a row grows instead of reserved for its longest possible length. This module
owns which of the P pages are free; it is a pytree carried by the decode loops, and
every function is pure and shape-static (no host round trip per claim):

    free_P[:top]   the free page ids, a stack: claims pop from the top
    refs_P[p]      block-table entries pointing at page p (0 = free)
    exhausted      a claim found the stack empty; it got NULL_PAGE instead

Invariants (tests/model/test_page_pool.py checks them on random grow / fork / free
sequences): a page is on the stack exactly when its count is 0, never twice; the
counts are the number of table entries that name the page, so a page shared by
forked rows (vLLM §4.4) returns to the stack only when its last holder lets go.

`null_page(pool)` == P names "no page": scatters with mode='drop' skip it and gathers
clip it, so a row without a page never writes over another row's data.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class PagePool:
  """Allocator state (see the module docstring)."""

  free_P: jax.Array     # int32 [P]: free_P[:top] are the free pages
  top: jax.Array        # int32 []: number of free pages
  refs_P: jax.Array     # int32 [P]: references to each page
  exhausted: jax.Array  # bool []: some claim could not be met

  @property
  def num_pages(self) -> int:
    return self.free_P.shape[0]

  @property
  def in_use(self):
    """Pages held by some row (int32 [])."""
    return self.num_pages - self.top


def null_page(pool: PagePool) -> int:
  """The id that means "no page": one past the last page."""
  return pool.num_pages


def new_pool(num_pages: int) -> PagePool:
  """Every page free; the first claims get pages 0, 1, 2, ..."""
  if num_pages < 1:
    raise ValueError(f"num_pages: a pool needs at least one page (got {num_pages})")
  return PagePool(free_P=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),
                  top=jnp.int32(num_pages), refs_P=jnp.zeros((num_pages,), jnp.int32),
                  exhausted=jnp.zeros((), bool))


def claim(pool: PagePool, want_N):
  """One fresh page (count 1) for every True entry of want_N, in order.

  Returns (pool, pages_N): pages_N[i] is the page of entry i, or NULL_PAGE where
  want_N[i] is False or the stack ran out (then `exhausted` is set).
  """
  want_N = want_N.astype(bool)
  rank_N = jnp.cumsum(want_N.astype(jnp.int32)) - 1
  ok_N = want_N & (rank_N < pool.top)
  idx_N = jnp.clip(pool.top - 1 - rank_N, 0, pool.num_pages - 1)
  pages_N = jnp.where(ok_N, pool.free_P[idx_N], null_page(pool))
  return pool.replace(
      top=pool.top - jnp.sum(ok_N, dtype=jnp.int32),
      refs_P=pool.refs_P.at[pages_N].set(1, mode="drop"),
      exhausted=pool.exhausted | jnp.any(want_N & ~ok_N)), pages_N


def add_refs(pool: PagePool, pages_N, delta_N) -> PagePool:
  """refs[pages_N[i]] += delta_N[i] (NULL_PAGE entries skipped; repeats add up).

  Pages whose count falls to 0 go back on the stack, once each.
  """
  delta_N = jnp.broadcast_to(jnp.asarray(delta_N, jnp.int32), pages_N.shape)
  refs_P = pool.refs_P.at[pages_N].add(delta_N, mode="drop")
  return push(pool.replace(refs_P=refs_P), (pool.refs_P > 0) & (refs_P == 0))


def push(pool: PagePool, freed_P) -> PagePool:
  """Puts the pages marked in freed_P (bool [P], none already free) on the stack."""
  p = pool.num_pages
  pos_P = pool.top + jnp.cumsum(freed_P.astype(jnp.int32)) - 1
  free_P = pool.free_P.at[jnp.where(freed_P, pos_P, p)].set(
      jnp.arange(p, dtype=jnp.int32), mode="drop")
  return pool.replace(free_P=free_P, top=pool.top + jnp.sum(freed_P, dtype=jnp.int32))


def free_mask(pool: PagePool):
  """bool [P]: the pages now on the stack."""
  p = pool.num_pages
  on_stack_P = jnp.arange(p) < pool.top
  return jnp.zeros((p,), bool).at[jnp.where(on_stack_P, pool.free_P, p)].set(True, mode="drop")
