"""Paged GQA decode attention: one query token per row over a paged KV cache.

    o[b, h] = sum_{t < len_b} softmax_t(scale * q[b, h] . k[b, t, h // G]) v[b, t, h // G]

Token t of row b lives in page block_tables[b, t // S], slot t % S (PagedAttention,
Kwon et al. 2023, arXiv 2309.06180). The kernels run the online softmax (Milakov &
Gimelshein 2018, arXiv 1805.02867; FlashAttention, Dao et al. 2022, arXiv 2205.14135)
over blocks of `pages_per_block` pages: m' = max(m, max_t s_t), a = e^(m - m'),
l' = a l + sum_t e^(s_t - m'), acc' = a acc + sum_t e^(s_t - m') v_t, o = acc / l.
A program owns one (row, kv head, split) and reads each K/V block once for the G query
heads sharing it (GQA, Ainslie et al. 2023, arXiv 2305.13245), as a [G, E] tile.
Split-K (Flash-Decoding, Dao, Haziza, Massa and Sizov 2023, "Flash-Decoding for
long-context inference") cuts a row's pages into `num_splits` chunks, each writing
partials (acc, m, l) that `merge_splits` combines by log-sum-exp:
o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s.

Scores past a row's length become -inf and the matching V rows 0 before any product,
so stale or NaN cache slots never reach o; length 0 gives zeros. Neither kernel reads
a page past ceil(length / S) (GPU: loads masked per slot; TPU: only pages below the
length are copied), so table entries past it may hold anything. Lengths are clipped
to [0, M * S], table entries to [0, P).

impl:
  reference  plain XLA (gathers each row's pages); the kernels are tested against it.
  gpu        Pallas Triton, grid (B, K, splits); a block's table slice is loaded as a
             vector, its pages gathered by pointer. Triton tensors are powers of two:
             E >= 16, S and pages_per_block with S * pages_per_block >= 16 (tl.dot); G
             is padded to >= 16 rows. Triton, not Mosaic GPU: it runs on jax 0.10 and
             0.11 and lowers and interprets on a CPU-only jaxlib, so CI checks it.
  tpu        Pallas Mosaic TPU, grid (B, K, splits): lengths and tables scalar-prefetched
             into SMEM; pages stay in HBM, those below the length DMAed into a two-slot
             VMEM buffer, block i + 1 in flight while block i is computed. S a multiple
             of the sublane tile (8 rows of 32-bit, 16 of 16-bit); G padded to it.
  auto       gpu on a GPU backend, tpu on a TPU, reference otherwise.
float32 or bfloat16 inputs (one dtype), float32 accumulation, q's dtype out.

Shapes: B rows, H query heads, K kv heads, G = H / K, E head width, P pages, S page size,
M pages per row, N pages and T tokens of a block, R rows of a tile, X copies of m or l.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

IMPLS = ("auto", "reference", "gpu", "tpu")
TUNING = ("pages_per_block", "num_splits", "num_warps", "num_stages")
LANES = 128  # TPU lane width: m and l are kept as 128 lane copies
GPU_PROGRAMS = 256  # default splits aim at this many programs (about 2 per H100/H200 SM)
NT, NN = ((1,), (1,)), ((1,), (0,))  # contractions a @ b.T, a @ b


def resolve_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  backend = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
  return backend.get(jax.default_backend(), "reference") if impl == "auto" else impl


def check_common(tuning, known, lengths_B, block_tables_BxM, batch, scale, **arrays):
  """Validates what both modules share; returns the tuning knobs by name (None = default)."""
  unknown = sorted(set(tuning) - set(known))
  if unknown:
    raise ValueError(f"unknown tuning argument(s) {unknown}; known: {known}")
  for name, value in tuning.items():
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
  if set(dtypes.values()) not in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}):
    raise ValueError(f"{', '.join(dtypes)} must share one dtype, float32 or bfloat16; got "
                     + ", ".join(f"{n}={d}" for n, d in dtypes.items()))
  if block_tables_BxM.ndim != 2 or block_tables_BxM.shape[0] != batch:
    raise ValueError(f"block_tables_BxM must be [B={batch}, M], got {block_tables_BxM.shape}")
  if lengths_B.shape != (batch,):
    raise ValueError(f"lengths_B must be [B={batch}], got {lengths_B.shape}")
  for name, x in (("block_tables_BxM", block_tables_BxM), ("lengths_B", lengths_B)):
    if x.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32, got {x.dtype}")
  if (tuning.get("num_splits") or 1) > block_tables_BxM.shape[1]:
    raise ValueError(f"num_splits={tuning['num_splits']} exceeds the pages per row "
                     f"M={block_tables_BxM.shape[1]}")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
    raise ValueError(f"scale must be a positive finite Python float, got {scale!r}")
  return {name: tuning.get(name) for name in known}


def block_plan(which, knobs, page_size, table_width, dtype, tokens, programs):
  """Validated (pages_per_block, num_splits); defaults: blocks of about `tokens` tokens,
  on GPU enough splits for about GPU_PROGRAMS programs (at most one per block, 32)."""
  ppb, splits = knobs["pages_per_block"], knobs["num_splits"]
  if which == "tpu":
    if page_size % sublanes(dtype):
      raise ValueError(f"the TPU kernel needs S a multiple of {sublanes(dtype)} for "
                       f"{jnp.dtype(dtype).name}; got S={page_size}")
    return ppb or max(1, min(tokens // page_size, table_width)), splits or 1
  fit = min(tokens // page_size, pl.next_power_of_2(table_width))
  ppb = ppb or max(pl.cdiv(16, page_size), fit)
  if not (is_pow2(page_size) and is_pow2(ppb) and ppb * page_size >= 16):
    raise ValueError(f"the GPU kernel needs S and pages_per_block powers of two with "
                     f"pages_per_block * S >= 16; got S={page_size}, pages_per_block={ppb}")
  blocks = pl.cdiv(table_width, ppb)
  return ppb, splits or max(1, min(pl.cdiv(GPU_PROGRAMS, programs), blocks, 32))


def is_pow2(n):
  return n >= 1 and n & (n - 1) == 0


def sublanes(dtype):
  """Rows of a TPU (sublane, lane) tile: 8 for 32-bit dtypes, 16 for 16-bit ones."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


def split_plan(table_width, pages_per_block, num_splits):
  """(pages per split, padded table width): each split a whole number of blocks."""
  per_split = pl.cdiv(pl.cdiv(table_width, num_splits), pages_per_block) * pages_per_block
  return per_split, per_split * num_splits


def split_window(length, split, page_size, pages_per_block, pages_per_split):
  """In-kernel: (first page of this split, its pages below the length, its blocks)."""
  first = split * pages_per_split
  n_pages = lax.div(length + page_size - 1, page_size) - first
  n_pages = jnp.maximum(jnp.minimum(n_pages, pages_per_split), 0)
  return first, n_pages, lax.div(n_pages + pages_per_block - 1, pages_per_block)


def gpu_block(tables_ref, i, first, length, pages_per_block, page_size, num_pages):
  """Triton: (pages, valid_NxSx1, valid_T) of block i of a split; N = pages_per_block."""
  pages_N = tables_ref[pl.ds(i * pages_per_block, pages_per_block)]
  pages_N = jnp.minimum(jnp.maximum(pages_N, 0), num_pages - 1)
  page_N = first + i * pages_per_block + jnp.arange(pages_per_block)
  valid_NxSx1 = page_N[:, None, None] * page_size + jnp.arange(page_size)[None, :, None] < length
  return pages_N, valid_NxSx1, valid_NxSx1.reshape(pages_per_block * page_size)


def gpu_tile(ref, pages_N, valid_NxSx1, col, width):
  """Triton: columns [col, col + width) of the slots of pages_N as [N * S, width]; slots
  past the length are not read (0: a masked load, so no NaN reaches a product)."""
  n, s, _ = valid_NxSx1.shape
  idx = (pages_N[:, None, None], jnp.arange(s)[None, :, None],
         col + jnp.arange(width)[None, None, :])
  return pltr.load(ref.at[idx], mask=valid_NxSx1, other=0).reshape(n * s, width)


def pad_axis(x, axis, size):
  return jnp.pad(x, [(0, size - n if a == axis else 0) for a, n in enumerate(x.shape)])


def dot(a, b, contract):
  """a . b contracting `contract`, float32 result (full f32 precision for f32 inputs)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def online_softmax(s_RxT, m_RxX, l_RxX):
  """One block: (p_RxT, correction a_Rx1 of acc, new m_RxX, new l_RxX)."""
  m_new = jnp.maximum(m_RxX, jnp.max(s_RxT, axis=1, keepdims=True))  # finite: a block
  a_RxX = jnp.exp(m_RxX - m_new)                                     # has a valid token
  p_RxT = jnp.exp(s_RxT - m_new[:, :1])
  return p_RxT, a_RxX[:, :1], m_new, a_RxX * l_RxX + jnp.sum(p_RxT, axis=1, keepdims=True)


def finish(out_refs, acc_RxW, m_RxX, l_RxX):
  """Writes o = acc / l (one split) or this split's partials (acc, m, l)."""
  if len(out_refs) == 1:
    l_Rx1 = l_RxX[:, :1]
    out_refs[0][...] = (acc_RxW / jnp.where(l_Rx1 > 0, l_Rx1, 1.0)).astype(out_refs[0].dtype)
  else:
    for ref, x in zip(out_refs, (acc_RxW, m_RxX, l_RxX)):
      ref[...] = x


def merge_splits(acc_XxSxRxW, m_XxSxRxX, l_XxSxRxX):
  """Log-sum-exp merge of split partials: acc [..., S, R, W], m and l [..., S, R, X]."""
  m, l = m_XxSxRxX[..., 0], l_XxSxRxX[..., 0]
  m_top = jnp.max(m, axis=-2, keepdims=True)
  w = jnp.exp(m - jnp.where(jnp.isfinite(m_top), m_top, 0.0))  # 0 for empty splits
  l_sum = jnp.sum(w * l, axis=-2)
  acc = jnp.sum(w[..., None] * acc_XxSxRxW, axis=-3)
  return acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]  # acc = 0 where l = 0


def split_outputs(lead, splits, rows, width, dtype, stats, grid_index):
  """(out_shape, out_specs): o [*lead, rows, width] in `dtype` for one split, else
  float32 partials acc [*lead, splits, rows, width], m and l [*lead, splits, rows,
  stats]. grid_index(*program_ids) -> (lead block indices, split index)."""
  shapes = ([(*lead, rows, width)] if splits == 1 else
            [(*lead, splits, rows, width)] + [(*lead, splits, rows, stats)] * 2)
  dtype = dtype if splits == 1 else jnp.float32
  squeezed = len(lead) + (splits > 1)

  def spec(shape):
    def index_map(*ids):
      lead_ids, split = grid_index(*ids)
      return (*lead_ids, *([split] if splits > 1 else []), *[0] * (len(shape) - squeezed))
    return pl.BlockSpec((None,) * squeezed + shape[squeezed:], index_map)

  return [jax.ShapeDtypeStruct(s, dtype) for s in shapes], [spec(s) for s in shapes]


def triton_call(num_warps, num_stages, interpret):
  """pallas_call's compiler_params and interpret for a Triton kernel (jax 0.10 and 0.11 names)."""
  cls = getattr(pltr, "CompilerParams", None) or getattr(pltr, "TritonCompilerParams")
  return dict(compiler_params=cls(num_warps=num_warps, num_stages=num_stages),
              interpret=bool(interpret))


def tpu_call(num_dims, interpret):
  """pallas_call's compiler_params (all grid axes parallel) and interpret (the
  InterpretParams given, default ones for True) for a TPU kernel."""
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  if interpret and not isinstance(interpret, pltpu.InterpretParams):
    interpret = pltpu.InterpretParams()
  return dict(compiler_params=cls(dimension_semantics=("parallel",) * num_dims),
              interpret=interpret or False)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_attention_reference(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM,
                              lengths_B, *, scale=None):
  """Plain-XLA paged GQA decode attention (the kernels' semantics)."""
  b, h, e = q_BxHxE.shape
  k, p, s, _ = k_pages_KxPxSxE.shape
  t = block_tables_BxM.shape[1] * s
  tables_BxM = jnp.clip(block_tables_BxM, 0, p - 1)
  gather = lambda x: jnp.swapaxes(x[:, tables_BxM].reshape(k, b, t, e), 0, 1)  # [B, K, T, E]
  valid_BxT = jnp.arange(t)[None] < jnp.clip(lengths_B, 0, t)[:, None]
  hi = lax.Precision.HIGHEST
  s_BxKxGxT = jnp.einsum("bkge,bkte->bkgt", q_BxHxE.reshape(b, k, h // k, e),
                         gather(k_pages_KxPxSxE), precision=hi, preferred_element_type=jnp.float32)
  scale = e ** -0.5 if scale is None else scale
  p_BxKxGxT = jax.nn.softmax(s_BxKxGxT * scale, axis=-1, where=valid_BxT[:, None, None])
  v_BxKxTxE = jnp.where(valid_BxT[:, None, :, None], gather(v_pages_KxPxSxE), 0)  # 0 * NaN = NaN
  o_BxKxGxE = jnp.einsum("bkgt,bkte->bkge", p_BxKxGxT, v_BxKxTxE.astype(jnp.float32),
                         precision=hi)
  return o_BxKxGxE.reshape(b, h, e).astype(q_BxHxE.dtype)


def _gpu_kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, scale, pages_per_block,
                pages_per_split):
  num_pages, page_size, head_dim = k_ref.shape
  length = lengths_ref[pl.program_id(0)]
  first, _, num_blocks = split_window(length, pl.program_id(2), page_size, pages_per_block,
                                      pages_per_split)
  q_GxE = q_ref[...]

  def body(i, carry):
    acc_GxE, m_Gx1, l_Gx1 = carry
    pages_N, valid_NxSx1, valid_T = gpu_block(tables_ref, i, first, length, pages_per_block,
                                              page_size, num_pages)
    s_GxT = dot(q_GxE, gpu_tile(k_ref, pages_N, valid_NxSx1, 0, head_dim), NT) * scale
    p_GxT, a_Gx1, m_Gx1, l_Gx1 = online_softmax(jnp.where(valid_T[None, :], s_GxT, -jnp.inf),
                                                 m_Gx1, l_Gx1)
    v_TxE = gpu_tile(v_ref, pages_N, valid_NxSx1, 0, head_dim)
    return acc_GxE * a_Gx1 + dot(p_GxT.astype(v_TxE.dtype), v_TxE, NN), m_Gx1, l_Gx1

  rows = q_GxE.shape[0]
  init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  finish(out_refs, *lax.fori_loop(0, num_blocks, body, init))


def _tpu_kernel(lengths_ref, tables_ref, q_ref, k_hbm, v_hbm, *refs, scale, pages_per_block,
                pages_per_split, table_width):
  *out_refs, k_buf, v_buf, sems, acc_ref, m_ref, l_ref = refs
  b, h = pl.program_id(0), pl.program_id(1)
  _, num_pages, page_size, head_dim = k_hbm.shape
  block_t = pages_per_block * page_size
  length = lengths_ref[b]
  first, n_pages, num_blocks = split_window(length, pl.program_id(2), page_size,
                                            pages_per_block, pages_per_split)

  def page_copies(block, slot):  # (needed?, copy) for K and V of each page of a block
    for j in range(pages_per_block):
      page = block * pages_per_block + j
      src = jnp.clip(tables_ref[b * table_width + first + page], 0, num_pages - 1)
      for hbm, buf in ((k_hbm, k_buf), (v_hbm, v_buf)):
        yield page < n_pages, pltpu.make_async_copy(hbm.at[h, src], buf.at[slot, j], sems.at[slot])

  def start(block, slot):
    for needed, copy in page_copies(block, slot):
      pl.when(needed)(copy.start)

  acc_ref[...] = jnp.zeros_like(acc_ref)
  m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
  l_ref[...] = jnp.zeros_like(l_ref)
  pl.when(num_blocks > 0)(lambda: start(0, 0))

  def body(i, carry):
    slot = lax.rem(i, 2)
    pl.when(i + 1 < num_blocks)(lambda: start(i + 1, 1 - slot))
    for needed, copy in page_copies(i, slot):
      pl.when(needed)(copy.wait)
    tok0 = (first + i * pages_per_block) * page_size
    s_GxT = dot(q_ref[...], k_buf[slot].reshape(block_t, head_dim), NT) * scale
    s_GxT = jnp.where(tok0 + lax.broadcasted_iota(jnp.int32, s_GxT.shape, 1) < length, s_GxT,
                      -jnp.inf)
    p_GxT, a_Gx1, m_ref[...], l_ref[...] = online_softmax(s_GxT, m_ref[...], l_ref[...])
    v_TxE = v_buf[slot].reshape(block_t, head_dim)
    v_TxE = jnp.where(tok0 + lax.broadcasted_iota(jnp.int32, v_TxE.shape, 0) < length, v_TxE, 0)
    acc_ref[...] = acc_ref[...] * a_Gx1 + dot(p_GxT.astype(v_TxE.dtype), v_TxE, NN)
    return carry

  lax.fori_loop(0, num_blocks, body, 0)
  finish(out_refs, acc_ref[...], m_ref[...], l_ref[...])


@functools.partial(jax.jit, static_argnames=("impl", "scale", "pages_per_block", "num_splits",
                                             "num_warps", "num_stages", "interpret"))
def _paged_attention_kernel(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM,
                            lengths_B, *, impl, scale, pages_per_block, num_splits, num_warps,
                            num_stages, interpret):
  b, h, e = q_BxHxE.shape
  k, p, s, _ = k_pages_KxPxSxE.shape
  g = h // k
  tile = sublanes(q_BxHxE.dtype)
  rows = max(16, pl.next_power_of_2(g)) if impl == "gpu" else pl.cdiv(g, tile) * tile
  per_split, width = split_plan(block_tables_BxM.shape[1], pages_per_block, num_splits)
  tables_BxM = pad_axis(block_tables_BxM, 1, width)
  q_BxKxGxE = pad_axis(q_BxHxE.reshape(b, k, g, e), 2, rows)
  if impl == "gpu":
    out_shape, out_specs = split_outputs((b, k), num_splits, rows, e, q_BxHxE.dtype, 1,
                                         lambda i, j, n: ((i, j), n))
    pages_spec = pl.BlockSpec((None, p, s, e), lambda i, j, n: (j, 0, 0, 0))
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, scale=scale, pages_per_block=pages_per_block,
                          pages_per_split=per_split),
        grid=(b, k, num_splits), out_shape=out_shape, out_specs=out_specs,
        in_specs=[pl.BlockSpec((b,), lambda i, j, n: (0,)),
                  pl.BlockSpec((None, per_split), lambda i, j, n: (i, n)),
                  pl.BlockSpec((None, None, rows, e), lambda i, j, n: (i, j, 0, 0)),
                  pages_spec, pages_spec],
        name="paged_attention_gpu", **triton_call(num_warps, num_stages, interpret),
    )(lengths_B, tables_BxM, q_BxKxGxE, k_pages_KxPxSxE, v_pages_KxPxSxE)
  else:
    out_shape, out_specs = split_outputs((b, k), num_splits, rows, e, q_BxHxE.dtype, LANES,
                                         lambda i, j, n, *_: ((i, j), n))
    buf = pltpu.VMEM((2, pages_per_block, s, e), k_pages_KxPxSxE.dtype)
    stats = pltpu.VMEM((rows, LANES), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale, pages_per_block=pages_per_block,
                          pages_per_split=per_split, table_width=width),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, k, num_splits), out_specs=out_specs,
            in_specs=[pl.BlockSpec((None, None, rows, e), lambda i, j, n, *_: (i, j, 0, 0)),
                      pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((rows, e), jnp.float32), stats, stats]),
        name="paged_attention_tpu", **tpu_call(3, interpret),
    )(lengths_B, tables_BxM.reshape(-1), q_BxKxGxE, k_pages_KxPxSxE, v_pages_KxPxSxE)
  o_BxKxGxE = out[0] if num_splits == 1 else merge_splits(*out)
  return o_BxKxGxE[:, :, :g].reshape(b, h, e).astype(q_BxHxE.dtype)


def paged_attention(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM, lengths_B, *,
                    scale=None, impl="auto", interpret=False, **tuning):
  """Decode attention of q_BxHxE over the paged cache; returns o_BxHxE in q's dtype.

  scale: None for 1/sqrt(E). impl: "auto" | "reference" | "gpu" | "tpu".
  interpret: run the chosen Pallas kernel in interpret mode (True, or TPU
  `pltpu.InterpretParams`). tuning: pages_per_block, num_splits (both kernels),
  num_warps, num_stages (GPU); absent or None picks a default.
  """
  which = resolve_impl(impl)
  if q_BxHxE.ndim != 3 or k_pages_KxPxSxE.ndim != 4:
    raise ValueError(f"q_BxHxE must be [B, H, E] and k_pages_KxPxSxE [K, P, S, E]; got "
                     f"{q_BxHxE.shape} and {k_pages_KxPxSxE.shape}")
  b, h, e = q_BxHxE.shape
  k, _, s, e_k = k_pages_KxPxSxE.shape
  if v_pages_KxPxSxE.shape != k_pages_KxPxSxE.shape or e_k != e:
    raise ValueError(f"k_pages_KxPxSxE {k_pages_KxPxSxE.shape} and v_pages_KxPxSxE "
                     f"{v_pages_KxPxSxE.shape} must be one [K, P, S, E] shape, E={e} of q_BxHxE")
  if h % k:
    raise ValueError(f"kv heads K={k} must divide query heads H={h}")
  scale = e ** -0.5 if scale is None else scale
  knobs = check_common(tuning, TUNING, lengths_B, block_tables_BxM, b, scale, q_BxHxE=q_BxHxE,
                       k_pages_KxPxSxE=k_pages_KxPxSxE, v_pages_KxPxSxE=v_pages_KxPxSxE)
  m = block_tables_BxM.shape[1]
  args = (q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM,
          jnp.clip(lengths_B, 0, m * s))
  if which == "reference":
    return paged_attention_reference(*args, scale=float(scale))
  if which == "gpu" and not (is_pow2(e) and e >= 16):
    raise ValueError(f"the GPU kernel needs E a power of two >= 16; got E={e}")
  tokens = {"gpu": 128 if e <= 128 else 64, "tpu": 256}[which]
  ppb, splits = block_plan(which, knobs, s, m, q_BxHxE.dtype, tokens, b * k)
  return _paged_attention_kernel(*args, impl=which, scale=float(scale), pages_per_block=ppb,
                                 num_splits=splits, num_warps=knobs["num_warps"] or 4,
                                 num_stages=knobs["num_stages"] or 2, interpret=interpret)
