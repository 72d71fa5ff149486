"""The paged KV cache: a page pool per block and one block table (kind 'paged').

The second implementation of the cache protocol (model/cache.py), after PagedAttention
(Kwon et al. 2023, arXiv 2309.06180 §4.2-4.4): a reservation-based cache keeps slots
for every row's longest possible length, most of them never filled (20.4-38.2% of
them held token states in the systems vLLM measured, §2.3 and Fig. 2); here a row
holds only the pages its tokens have reached. Position p of row b lives in

    page table_BxM[b, p // S], slot p % S,   of every block's k/v_pages_KxPxSxE

(the layout the Pallas kernels read, kernels/paged_attention.py). The block table
and the allocator (model/page_pool.py: free stack, top, reference counts) are shared
by all blocks and travel in the loop carry, so pages are claimed inside the jitted
loop:

* `reserve(positions_BxL)` (once per step, before block 0): a row claims a page when
  its writes cross into a page it does not have, and copies a page it shares with
  other rows before writing into it (copy-on-write, §4.4): the copy goes to a fresh
  page in every block and the shared page loses one holder. When every holder of a
  shared page writes it in the same step, the first keeps it.
* `update` scatters the step's K/V into the row's pages; `attend` gathers them by
  block table, masked by length (model/paged_attend.py). With impl.attention='pallas'
  (`attend_update`) a one-token step writes first and the Pallas kernel then reads the
  row's pages in place, its new token included: the kernels return no log-sum-exp to
  merge the step's own key with; multi-token steps (prefill) stay on the XLA gather.
* `repeat(n)` gives a prompt's n beams / samples its pages by reference (counts +
  n - 1): its full pages stay shared for good, its partial last page is copied by
  the first write of each beam. `reorder(rows_B)` copies block-table rows and moves
  reference counts (a dropped beam's pages free themselves), never K/V.
* `release(rows_B)` returns a finished row's pages to the pool (those still shared
  stay with their other holders).

`limit_B[b]` bounds what row b may hold: positions >= limit_B[b] are neither
reserved nor written (the engine admits a request with limit = prompt + new tokens,
prefills with limit = prompt length so a right-padded tail claims nothing), and 0
marks an empty or released row. Nothing is ever overwritten: a claim that finds the
pool empty leaves the entry NULL_PAGE (writes there are dropped) and sets
`pool.exhausted`; `PagedSpec.check` refuses a request that could get there before
anything compiles. No growing windows (`windows(P, total)` is `(total,)`): a step
reads a row's pages through its table, and the kernels (the CPU one here, the Pallas
ones) stop at the row's length, so a wide table costs them nothing; the XLA gather
reads the full width, as an ungrown contiguous cache does.

What a page holds is the layer class's business (`write`, `copy_pages`): K/V pools
(`LayerPages`; MLA with impl.mla='expanded' has H heads of nope + R keys and v-wide
values) or, for absorbed MLA (model/mla.py), one `latent_pages_PxSxW` of [c_kv ;
k_rope] (`LatentPages`, the latent variant of the protocol); the table, the
allocator and the row methods are the same for both.

Shape names (README legend): B rows, L tokens per step, K kv heads, E head width,
P pages, S page size, M pages per row, N flattened entries.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from kernels import paged_attention_cpu
from model import page_pool
from model.cache import BF16_BITS, register, stored
from model.config import ModelConfig
from model.impl import ModelImpl, resolve_mla
from model.mla import attend_latent_cached
from model.paged_attend import attend_paged, pallas_attend, pallas_attend_latent, pallas_error


@flax.struct.dataclass
class LayerPages:
  """One block's pools: k/v_pages_KxPxSxE."""

  k_pages_KxPxSxE: jax.Array
  v_pages_KxPxSxE: jax.Array

  def write(self, page_N, slot_N, k_NxKxE, v_NxKxE) -> "LayerPages":
    """pool[:, page_N[i], slot_N[i]] = new[i]; NULL_PAGE entries are dropped."""
    put = lambda pool, new: pool.at[:, page_N, slot_N].set(
        stored(jnp.swapaxes(new, 0, 1), pool.dtype), mode="drop")
    return LayerPages(put(self.k_pages_KxPxSxE, k_NxKxE), put(self.v_pages_KxPxSxE, v_NxKxE))

  def copy_pages(self, src_N, dst_N) -> "LayerPages":
    """Page dst_N[i] <- page src_N[i]; NULL_PAGE destinations are skipped."""
    cp = lambda pool: pool.at[:, dst_N].set(jnp.take(pool, src_N, axis=1, mode="clip"),
                                            mode="drop")
    return LayerPages(cp(self.k_pages_KxPxSxE), cp(self.v_pages_KxPxSxE))


@flax.struct.dataclass
class LatentPages:
  """One MLA block's pool of [c_kv ; k_rope] latents (model/latent_cache.py's entry):
  latent_pages_PxSxW, W = C + R, the layout of kernels/mla_attention.py."""

  latent_pages_PxSxW: jax.Array

  def write(self, page_N, slot_N, w_NxW) -> "LatentPages":
    return LatentPages(self.latent_pages_PxSxW.at[page_N, slot_N].set(
        w_NxW.astype(self.latent_pages_PxSxW.dtype), mode="drop"))

  def copy_pages(self, src_N, dst_N) -> "LatentPages":
    pool = self.latent_pages_PxSxW
    return LatentPages(pool.at[dst_N].set(jnp.take(pool, src_N, axis=0, mode="clip"),
                                          mode="drop"))


@flax.struct.dataclass
class PagedKVCache:
  """Page pools per block, the shared block table, row limits and the allocator."""

  layers: tuple                 # LayerPages (or LatentPages) per block
  table_BxM: jax.Array          # int32: page of each row's j-th page; NULL_PAGE if none
  limit_B: jax.Array            # int32: row b holds positions < limit_B[b] (0: no row)
  pool: page_pool.PagePool
  page_size: int = flax.struct.field(pytree_node=False, default=16)

  @property
  def batch(self) -> int:
    return self.table_BxM.shape[0]

  @property
  def max_len(self) -> int:
    return self.table_BxM.shape[1] * self.page_size

  @property
  def null(self) -> int:
    return page_pool.null_page(self.pool)

  def page_of(self, positions_BxL):
    """The page each position lives in; NULL_PAGE where the row may not hold it."""
    j_BxL = positions_BxL // self.page_size
    m = self.table_BxM.shape[1]
    page = jnp.take_along_axis(self.table_BxM, jnp.clip(j_BxL, 0, m - 1), axis=1)
    ok = (positions_BxL >= 0) & (j_BxL < m) & (positions_BxL < self.limit_B[:, None])
    return jnp.where(ok, page, self.null)

  def reserve(self, positions_BxL) -> "PagedKVCache":
    """Claims (or copies, when shared) every page this step writes; see the docstring."""
    b, l = positions_BxL.shape
    s, m = self.page_size, self.table_BxM.shape[1]
    first_B = positions_BxL[:, 0]
    last_B = jnp.minimum(positions_BxL[:, -1], self.limit_B - 1)
    j_BxJ = first_B[:, None] // s + jnp.arange(min(m, (l + s - 2) // s + 1), dtype=jnp.int32)
    touched = ((j_BxJ <= (last_B // s)[:, None]) & (j_BxJ < m)
               & ((first_B >= 0) & (first_B < self.limit_B))[:, None])
    col_BxJ = jnp.clip(j_BxJ, 0, m - 1)
    cur_N = jnp.where(touched, jnp.take_along_axis(self.table_BxM, col_BxJ, axis=1),
                      self.null).reshape(-1)
    pool, n = self.pool, cur_N.shape[0]
    refs_N = jnp.take(pool.refs_P, cur_N, mode="fill", fill_value=0)
    shared_N = refs_N > 1
    idx_N = jnp.arange(n, dtype=jnp.int32)
    shared_page_N = jnp.where(shared_N, cur_N, self.null)
    writers_P = jnp.zeros_like(pool.refs_P).at[shared_page_N].add(1, mode="drop")
    first_P = jnp.full_like(pool.refs_P, n).at[shared_page_N].min(idx_N, mode="drop")
    cur_c = jnp.clip(cur_N, 0, self.null - 1)
    keeps_N = shared_N & (writers_P[cur_c] == refs_N) & (first_P[cur_c] == idx_N)
    cow_N = shared_N & ~keeps_N
    need_N = (touched.reshape(-1) & (cur_N == self.null)) | cow_N
    pool, new_N = page_pool.claim(pool, need_N)
    rows_N = jnp.repeat(jnp.arange(b, dtype=jnp.int32), col_BxJ.shape[1])
    table = self.table_BxM.at[rows_N, jnp.where(need_N, col_BxJ.reshape(-1), m)].set(
        new_N, mode="drop")
    pool = page_pool.add_refs(pool, jnp.where(cow_N, cur_N, self.null), -1)
    dst_N = jnp.where(cow_N, new_N, self.null)
    layers = jax.lax.cond(jnp.any(cow_N),
                          lambda ls: tuple(x.copy_pages(cur_N, dst_N) for x in ls),
                          lambda ls: ls, self.layers)
    return self.replace(layers=layers, table_BxM=table, pool=pool)

  def attend(self, layer: int, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
             impl: str = "xla"):
    """The step's queries over the row's cached positions and the step's own keys.

    impl 'cpu' (decode/backend.py's choice on CPU): single-token steps over float32 or
    BF16_BITS pools run the C++ kernel (kernels/paged_attention_cpu.py), which reads each
    row's valid tokens in place, when it builds. Otherwise, and for multi-token steps, the XLA
    gather of model/paged_attend.py (its batch axes lead, so there is no layout for
    the block-diagonal CPU form of model/attention.py to avoid).
    """
    kv = self.layers[layer]
    length_B = jnp.clip(jnp.minimum(positions_BxL[:, 0], self.limit_B), 0, self.max_len)
    if (impl == "cpu" and positions_BxL.shape[1] == 1
        and kv.k_pages_KxPxSxE.dtype in (jnp.float32, BF16_BITS)
        and paged_attention_cpu.available()):
      return paged_attention_cpu.paged_decode_attention(
          q_BxLxHxE[:, 0], kv.k_pages_KxPxSxE, kv.v_pages_KxPxSxE, self.table_BxM, length_B,
          k_BxLxKxE[:, 0], v_BxLxKxE[:, 0])[:, None].astype(q_BxLxHxE.dtype)
    new_mask_BxLxL = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
    return attend_paged(q_BxLxHxE, kv.k_pages_KxPxSxE, kv.v_pages_KxPxSxE, self.table_BxM,
                        length_B, k_BxLxKxE, v_BxLxKxE, new_mask_BxLxL)

  def attend_update(self, layer: int, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
                    impl: ModelImpl):
    """(o, cache): `attend` then `update`, or with impl.attention='pallas' a one-token
    step's write, then the kernel over the pages (see the module docstring)."""
    if impl.attention != "pallas" or positions_BxL.shape[1] != 1:
      return (self.attend(layer, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
                          impl.attention), self.update(layer, k_BxLxKxE, v_BxLxKxE, positions_BxL))
    cache = self.update(layer, k_BxLxKxE, v_BxLxKxE, positions_BxL)
    kv = cache.layers[layer]
    o_BxHxE = pallas_attend(q_BxLxHxE[:, 0], kv.k_pages_KxPxSxE, kv.v_pages_KxPxSxE,
                            self.table_BxM, self.written_length(positions_BxL), impl)
    return o_BxHxE[:, None], cache

  def written_length(self, positions_BxL):
    """Tokens of row b after a one-token step's write: its cached ones and the new one
    where the write landed (a row at or past its limit reads its cache alone)."""
    length_B = jnp.clip(jnp.minimum(positions_BxL[:, 0], self.limit_B), 0, self.max_len)
    landed_B = self.page_of(positions_BxL[:, :1])[:, 0] != self.null
    return length_B + landed_B.astype(jnp.int32)

  def update(self, layer: int, k_BxLxKxE, v_BxLxKxE, positions_BxL) -> "PagedKVCache":
    """Writes block `layer`'s entries into the pages `reserve` gave them."""
    page_N = self.page_of(positions_BxL).reshape(-1)
    slot_N = (positions_BxL % self.page_size).reshape(-1)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    new = self.layers[layer].write(page_N, slot_N, flat(k_BxLxKxE), flat(v_BxLxKxE))
    return self.replace(layers=self.layers[:layer] + (new,) + self.layers[layer + 1:])

  def attend_latent(self, layer: int, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                    positions_BxL, scale: float, impl: str = "xla"):
    """Absorbed MLA (model/cache.py's latent variant) over the row's latent pages:
    gathered by block table, zero past the row's length, then model/mla.py's one
    softmax over them and the step's own latents."""
    del impl
    pool = self.layers[layer].latent_pages_PxSxW
    b, m = self.table_BxM.shape
    t = m * self.page_size
    length_B = jnp.clip(jnp.minimum(positions_BxL[:, 0], self.limit_B), 0, t)
    valid_BxT = jnp.arange(t, dtype=jnp.int32)[None] < length_B[:, None]
    kv_BxTxW = jnp.take(pool, jnp.clip(self.table_BxM, 0, pool.shape[0] - 1), axis=0,
                        mode="clip").reshape(b, t, pool.shape[-1])
    kv_BxTxW = jnp.where(valid_BxT[..., None], kv_BxTxW, jnp.zeros((), pool.dtype))
    cache_mask_BxLxT = jnp.broadcast_to(valid_BxT[:, None], positions_BxL.shape + (t,))
    new_mask_BxLxL = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
    return attend_latent_cached(q_latent_BxLxHxC, q_rope_BxLxHxR, kv_BxTxW, cache_mask_BxLxT,
                                w_BxLxW, new_mask_BxLxL, scale)

  def attend_update_latent(self, layer: int, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                           positions_BxL, scale: float, impl: ModelImpl):
    """`attend_update` for the latent pages: (o_latent, cache)."""
    if impl.attention != "pallas" or positions_BxL.shape[1] != 1:
      return (self.attend_latent(layer, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                                 positions_BxL, scale, impl.attention),
              self.update_latent(layer, w_BxLxW, positions_BxL))
    cache = self.update_latent(layer, w_BxLxW, positions_BxL)
    o_BxHxC = pallas_attend_latent(q_latent_BxLxHxC[:, 0], q_rope_BxLxHxR[:, 0],
                                   cache.layers[layer].latent_pages_PxSxW, self.table_BxM,
                                   self.written_length(positions_BxL), scale, impl)
    return o_BxHxC[:, None], cache

  def update_latent(self, layer: int, w_BxLxW, positions_BxL) -> "PagedKVCache":
    """Writes block `layer`'s [c_kv ; k_rope] into the pages `reserve` gave them."""
    page_N = self.page_of(positions_BxL).reshape(-1)
    slot_N = (positions_BxL % self.page_size).reshape(-1)
    new = self.layers[layer].write(page_N, slot_N, w_BxLxW.reshape(-1, w_BxLxW.shape[-1]))
    return self.replace(layers=self.layers[:layer] + (new,) + self.layers[layer + 1:])

  def repeat(self, n: int) -> "PagedKVCache":
    """Row r -> rows r*n .. r*n+n-1, all holding row r's pages (shared, counted)."""
    pool = page_pool.add_refs(self.pool, self.table_BxM.reshape(-1), n - 1)
    return self.replace(table_BxM=jnp.repeat(self.table_BxM, n, axis=0),
                        limit_B=jnp.repeat(self.limit_B, n), pool=pool)

  def reorder(self, rows_B) -> "PagedKVCache":
    """Row b <- row rows_B[b]: block-table rows and reference counts, no K/V."""
    table = jnp.take(self.table_BxM, rows_B, axis=0, mode="clip")
    moved = jnp.concatenate([table.reshape(-1), self.table_BxM.reshape(-1)])
    delta = jnp.concatenate([jnp.ones(table.size, jnp.int32),
                             -jnp.ones(self.table_BxM.size, jnp.int32)])
    return self.replace(table_BxM=table, pool=page_pool.add_refs(self.pool, moved, delta),
                        limit_B=jnp.take(self.limit_B, rows_B, mode="clip"))

  def grow(self, max_len: int) -> "PagedKVCache":
    """Wider block table (rows may reach `max_len` positions); the pool is unchanged."""
    m = -(-max_len // self.page_size)
    pad = ((0, 0), (0, m - self.table_BxM.shape[1]))
    grown = self.limit_B == self.max_len
    return self.replace(table_BxM=jnp.pad(self.table_BxM, pad, constant_values=self.null),
                        limit_B=jnp.where(grown, m * self.page_size, self.limit_B))

  def release(self, rows_B) -> "PagedKVCache":
    """Rows marked in rows_B (bool [B]) give back their pages and hold nothing more."""
    gone_BxM = rows_B[:, None] & (self.table_BxM != self.null)
    pool = page_pool.add_refs(self.pool, jnp.where(gone_BxM, self.table_BxM, self.null), -1)
    return self.replace(table_BxM=jnp.where(gone_BxM, self.null, self.table_BxM),
                        limit_B=jnp.where(rows_B, 0, self.limit_B), pool=pool)

  # Row views for the engine (decode/engine.py): prefill a few rows of the pool.
  def rows(self, slots_N, limit_N) -> "PagedKVCache":
    """A cache of rows slots_N (>= B: a row that holds nothing) over the same pools,
    with the given limits."""
    real_N = slots_N < self.batch
    table = jnp.take(self.table_BxM, slots_N, axis=0, mode="clip")
    return self.replace(table_BxM=jnp.where(real_N[:, None], table, self.null),
                        limit_B=jnp.where(real_N, limit_N, 0).astype(jnp.int32))

  def put_rows(self, slots_N, sub: "PagedKVCache", limit_N) -> "PagedKVCache":
    """This cache with rows slots_N taken from `sub` (a `rows` view), limits set."""
    return self.replace(layers=sub.layers, pool=sub.pool,
                        table_BxM=self.table_BxM.at[slots_N].set(sub.table_BxM, mode="drop"),
                        limit_B=self.limit_B.at[slots_N].set(limit_N, mode="drop"))


@register("paged")
@dataclasses.dataclass(frozen=True)
class PagedSpec:
  """Builds `PagedKVCache`s.

  page_size: S tokens per page (vLLM's default 16). num_pages: P, the pool of each
  device; 0 sizes it to the worst case of the request, rows * forks * ceil(max_len /
  S). forks: rows each initial row becomes by `repeat` (beams), for that worst case.
  """

  page_size: int = 16
  num_pages: int = 0
  forks: int = 1
  mla: str = "absorbed"
  devices: int = 1  # pools the request's num_pages was split into (`split`)

  @classmethod
  def from_config(cls, gen) -> "PagedSpec":
    return cls(page_size=gen.page_size, num_pages=gen.num_pages,
               forks=gen.num_beams if gen.strategy == "beam" else 1,
               mla=resolve_mla(gen.mla_impl))

  def pages_needed(self, rows: int, max_len: int) -> int:
    """Pages the rows can hold at most: every row's table full, nothing shared."""
    return rows * self.forks * math.ceil(max_len / self.page_size)

  def check(self, cfg: ModelConfig, rows: int, max_len: int) -> None:
    """Raises ValueError naming num_pages when `init(cfg, rows, max_len)` could run dry."""
    del cfg
    need = self.pages_needed(rows, max_len)
    if self.num_pages and self.num_pages < need:
      pool = (f"{self.num_pages * self.devices} pages split over {self.devices} devices "
              f"leave {self.num_pages} per device" if self.devices > 1
              else f"{self.num_pages} pages")
      raise ValueError(
          f"generation.num_pages: {pool} (of {self.page_size} tokens), which cannot hold "
          f"{rows * self.forks} rows of up to {max_len} positions: they need up to {need} "
          f"pages (use num_pages >= {need * self.devices}, or 0 to size the pool to the "
          "request)")

  def init(self, cfg: ModelConfig, rows: int, max_len: int, dtype=None) -> PagedKVCache:
    """Empty pools and block table: `rows` rows of up to max_len positions."""
    dt = jnp.dtype(dtype or cfg.dtype)
    m = math.ceil(max_len / self.page_size)
    p = self.num_pages or self.pages_needed(rows, max_len)
    s = self.page_size
    if cfg.attention == "mla" and self.mla == "absorbed":
      w = cfg.kv_lora_rank + cfg.rope_head_dim
      layers = tuple(LatentPages(jnp.zeros((p, s, w), dt)) for _ in range(cfg.num_layers))
    else:  # per-head K/V (MLA expanded: H heads of nope + R keys, v_head_dim values)
      mla = cfg.attention == "mla"
      heads = cfg.num_heads if mla else cfg.num_kv_heads
      ek = cfg.mla_nope_dim + cfg.rope_head_dim if mla else cfg.dim_per_head
      ev = cfg.mla_v_dim if mla else cfg.dim_per_head
      layers = tuple(LayerPages(jnp.zeros((heads, p, s, ek), dt),
                                jnp.zeros((heads, p, s, ev), dt)) for _ in range(cfg.num_layers))
    return PagedKVCache(
        layers=layers,
        table_BxM=jnp.full((rows, m), p, jnp.int32),
        limit_B=jnp.full((rows,), m * self.page_size, jnp.int32),
        pool=page_pool.new_pool(p), page_size=self.page_size)

  def kernel_error(self, cfg: ModelConfig, dtype, kernel: str, interpret: bool) -> str:
    """Why the Pallas `kernel` cannot run one-token steps of `cfg` over pools of `dtype`
    ('' if it can): the kernels' own checks, on abstract arrays (nothing compiles)."""
    impl = ModelImpl(attention="pallas", attention_kernel=kernel, interpret=interpret)
    pools = jax.eval_shape(lambda: self.init(cfg, 1, self.page_size, dtype)).layers[0]
    return pallas_error(jax.tree.leaves(pools), cfg.num_heads, cfg.rope_head_dim, impl)

  def windows(self, prompt_width: int, total: int) -> tuple[int, ...]:
    del prompt_width  # a step reads only the pages a row has
    return (total,)

  def split(self, num_devices: int) -> "PagedSpec":
    """Each device gets its own pool of num_pages // num_devices pages for its rows."""
    if not self.num_pages:
      return self
    return dataclasses.replace(self, num_pages=max(1, self.num_pages // num_devices),
                               devices=self.devices * num_devices)
