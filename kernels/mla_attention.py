"""Paged MLA decode attention in the absorbed form (DeepSeek-V2, arXiv 2405.04434 sec. 2.1).

With W_UK absorbed into the query and W_UV into the output projection, every
query head attends over one shared latent cache (the MQA form FlashMLA,
DeepSeek 2025, runs): per token the page holds [c_kv ; k_rope], C + R columns,

    s[b, h, t] = scale * (q_latent[b, h] . c_kv[b, t] + q_rope[b, h] . k_rope[b, t])
    o[b, h]    = sum_{t < len_b} softmax_t(s[b, h, t]) c_kv[b, t]      (o_latent, width C)

so the key is all C + R columns and the value the first C. `scale` is the
model's (1 / sqrt(nope + rope) in DeepSeek-V2), not 1 / sqrt(C + R), and so
has no default. Paging (PagedAttention, Kwon et al. 2023, arXiv 2309.06180),
the online softmax, split-K (Flash-Decoding, Dao et al. 2023) with its
log-sum-exp merge and the masking (scores past a length -inf, cache rows 0,
before any product, pages past it never read; length 0 gives zeros) are those
of `kernels/paged_attention.py`, whose helpers this module shares.

impl:
  reference  plain XLA; the kernels are tested against it.
  gpu        Pallas Triton, grid (head blocks, B, splits): `block_h` query heads
             per program (a power of two >= 16; H is padded to a multiple), so a
             page is read ceil(H / block_h) times, once when H <= block_h. The latent
             and rope columns are loaded as two tiles and scored with two dots; the
             latent tile is reused as the value. C and R must be powers of two
             >= 16 (Triton blocks); S and pages_per_block as in paged_attention.
  tpu        Pallas Mosaic TPU, grid (B, splits), all H heads as one tile: a page
             ([S, C + R]) is DMAed once into a two-slot VMEM buffer (block i + 1 in
             flight while block i is computed) and used as key (all columns, against
             [q_latent ; q_rope]) and value (the product's first C columns are kept).
             S must be a multiple of the sublane tile (8 rows of 32-bit, 16 of 16-bit).
  auto       gpu on a GPU backend, tpu on a TPU, reference otherwise.

float32 and bfloat16 inputs of one dtype; float32 accumulation; q's dtype out.

Shapes: B rows, H query heads, C latent width, R rope width, P pages, S page
size, M pages per row (block-table width), T tokens of a block.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.paged_attention import (LANES, NN, NT, block_plan, check_common, dot, finish,
                                     gpu_block, gpu_tile, is_pow2, merge_splits, online_softmax,
                                     pad_axis, resolve_impl, split_outputs, split_plan,
                                     split_window, sublanes, tpu_call, triton_call)

TUNING = ("pages_per_block", "num_splits", "block_h", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=("scale",))
def mla_decode_attention_reference(q_latent_BxHxC, q_rope_BxHxR, kv_pages_PxSx_C_R,
                                   block_tables_BxM, lengths_B, *, scale):
  """Plain-XLA paged MLA decode attention (same semantics as the kernels)."""
  b, h, c = q_latent_BxHxC.shape
  p, s, w = kv_pages_PxSx_C_R.shape
  t = block_tables_BxM.shape[1] * s
  kv_BxTxW = kv_pages_PxSx_C_R[jnp.clip(block_tables_BxM, 0, p - 1)].reshape(b, t, w)
  valid_BxT = jnp.arange(t)[None] < jnp.clip(lengths_B, 0, t)[:, None]
  hi = lax.Precision.HIGHEST
  score = lambda q, x: jnp.einsum("bhc,btc->bht", q, x, precision=hi,
                                  preferred_element_type=jnp.float32)
  s_BxHxT = (score(q_latent_BxHxC, kv_BxTxW[..., :c]) + score(q_rope_BxHxR, kv_BxTxW[..., c:]))
  p_BxHxT = jax.nn.softmax(s_BxHxT * scale, axis=-1, where=valid_BxT[:, None])
  c_BxTxC = jnp.where(valid_BxT[..., None], kv_BxTxW[..., :c], 0)  # 0 * NaN = NaN
  c_BxTxC = c_BxTxC.astype(jnp.float32)
  return jnp.einsum("bht,btc->bhc", p_BxHxT, c_BxTxC, precision=hi).astype(q_latent_BxHxC.dtype)


def _gpu_kernel(lengths_ref, tables_ref, ql_ref, qr_ref, kv_ref, *out_refs, scale,
                pages_per_block, pages_per_split):
  num_pages, page_size, _ = kv_ref.shape
  latent, rope = ql_ref.shape[-1], qr_ref.shape[-1]
  length = lengths_ref[pl.program_id(1)]
  first, _, num_blocks = split_window(length, pl.program_id(2), page_size, pages_per_block,
                                      pages_per_split)
  ql_HxC, qr_HxR = ql_ref[...], qr_ref[...]

  def body(i, carry):
    acc_HxC, m_Hx1, l_Hx1 = carry
    pages_N, valid_NxSx1, valid_T = gpu_block(tables_ref, i, first, length, pages_per_block,
                                              page_size, num_pages)
    c_TxC = gpu_tile(kv_ref, pages_N, valid_NxSx1, 0, latent)  # key and value
    r_TxR = gpu_tile(kv_ref, pages_N, valid_NxSx1, latent, rope)
    s_HxT = (dot(ql_HxC, c_TxC, NT) + dot(qr_HxR, r_TxR, NT)) * scale
    p_HxT, a_Hx1, m_Hx1, l_Hx1 = online_softmax(jnp.where(valid_T[None, :], s_HxT, -jnp.inf),
                                                 m_Hx1, l_Hx1)
    return acc_HxC * a_Hx1 + dot(p_HxT.astype(c_TxC.dtype), c_TxC, NN), m_Hx1, l_Hx1

  rows = ql_HxC.shape[0]
  init = (jnp.zeros((rows, latent), jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))
  finish(out_refs, *lax.fori_loop(0, num_blocks, body, init))


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "num_splits", "block_h",
                                             "num_warps", "num_stages", "interpret"))
def _mla_gpu(q_latent_BxHxC, q_rope_BxHxR, kv_pages_PxSx_C_R, block_tables_BxM, lengths_B, *,
             scale, pages_per_block, num_splits, block_h, num_warps, num_stages, interpret):
  b, h, c = q_latent_BxHxC.shape
  r = q_rope_BxHxR.shape[-1]
  p, s, w = kv_pages_PxSx_C_R.shape
  blocks = pl.cdiv(h, block_h)
  per_split, width = split_plan(block_tables_BxM.shape[1], pages_per_block, num_splits)
  ql = pad_axis(q_latent_BxHxC, 1, blocks * block_h).reshape(b, blocks, block_h, c)
  qr = pad_axis(q_rope_BxHxR, 1, blocks * block_h).reshape(b, blocks, block_h, r)
  kernel = functools.partial(_gpu_kernel, scale=scale, pages_per_block=pages_per_block,
                             pages_per_split=per_split)
  out_shape, out_specs = split_outputs((b, blocks), num_splits, block_h, c, q_latent_BxHxC.dtype,
                                       1, lambda j, i, n: ((i, j), n))
  q_spec = lambda width: pl.BlockSpec((None, None, block_h, width), lambda j, i, n: (i, j, 0, 0))
  out = pl.pallas_call(
      kernel, grid=(blocks, b, num_splits), out_shape=out_shape, out_specs=out_specs,
      in_specs=[pl.BlockSpec((b,), lambda j, i, n: (0,)),
                pl.BlockSpec((None, per_split), lambda j, i, n: (i, n)),
                q_spec(c), q_spec(r), pl.BlockSpec((p, s, w), lambda j, i, n: (0, 0, 0))],
      name="mla_decode_attention_gpu", **triton_call(num_warps, num_stages, interpret),
  )(lengths_B, pad_axis(block_tables_BxM, 1, width), ql, qr, kv_pages_PxSx_C_R)
  o = out[0] if num_splits == 1 else merge_splits(*out)
  return o.reshape(b, blocks * block_h, c)[:, :h].astype(q_latent_BxHxC.dtype)


def _tpu_kernel(lengths_ref, tables_ref, q_ref, kv_hbm, *refs, scale, pages_per_block,
                pages_per_split, table_width):
  *out_refs, buf, sems, acc_ref, m_ref, l_ref = refs
  b = pl.program_id(0)
  num_pages, page_size, width = kv_hbm.shape
  block_t = pages_per_block * page_size
  length = lengths_ref[b]
  first, n_pages, num_blocks = split_window(length, pl.program_id(1), page_size,
                                            pages_per_block, pages_per_split)

  def page_copies(block, slot):  # (needed?, copy) for each page of a block
    for j in range(pages_per_block):
      page = block * pages_per_block + j
      src = jnp.clip(tables_ref[b * table_width + first + page], 0, num_pages - 1)
      yield page < n_pages, pltpu.make_async_copy(kv_hbm.at[src], buf.at[slot, j], sems.at[slot])

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
    kv_TxW = buf[slot].reshape(block_t, width)
    kv_TxW = jnp.where(tok0 + lax.broadcasted_iota(jnp.int32, kv_TxW.shape, 0) < length, kv_TxW, 0)
    s_HxT = dot(q_ref[...], kv_TxW, NT) * scale
    s_HxT = jnp.where(tok0 + lax.broadcasted_iota(jnp.int32, s_HxT.shape, 1) < length, s_HxT,
                      -jnp.inf)
    p_HxT, a_Hx1, m_ref[...], l_ref[...] = online_softmax(s_HxT, m_ref[...], l_ref[...])
    acc_ref[...] = acc_ref[...] * a_Hx1 + dot(p_HxT.astype(kv_TxW.dtype), kv_TxW, NN)
    return carry

  lax.fori_loop(0, num_blocks, body, 0)
  finish(out_refs, acc_ref[...], m_ref[...], l_ref[...])


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "num_splits",
                                             "interpret"))
def _mla_tpu(q_latent_BxHxC, q_rope_BxHxR, kv_pages_PxSx_C_R, block_tables_BxM, lengths_B, *,
             scale, pages_per_block, num_splits, interpret):
  b, h, c = q_latent_BxHxC.shape
  _, s, w = kv_pages_PxSx_C_R.shape
  rows = pl.cdiv(h, sublanes(q_latent_BxHxC.dtype)) * sublanes(q_latent_BxHxC.dtype)
  per_split, width = split_plan(block_tables_BxM.shape[1], pages_per_block, num_splits)
  q_BxHxW = pad_axis(jnp.concatenate([q_latent_BxHxC, q_rope_BxHxR], axis=-1), 1, rows)
  kernel = functools.partial(_tpu_kernel, scale=scale, pages_per_block=pages_per_block,
                             pages_per_split=per_split, table_width=width)
  out_shape, out_specs = split_outputs((b,), num_splits, rows, w, q_latent_BxHxC.dtype, LANES,
                                       lambda i, n, *_: ((i,), n))
  out = pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, num_splits), out_specs=out_specs,
          in_specs=[pl.BlockSpec((None, rows, w), lambda i, n, *_: (i, 0, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          scratch_shapes=[pltpu.VMEM((2, pages_per_block, s, w), kv_pages_PxSx_C_R.dtype),
                          pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((rows, w), jnp.float32),
                          pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, LANES), jnp.float32)]),
      name="mla_decode_attention_tpu", **tpu_call(2, interpret),
  )(lengths_B, pad_axis(block_tables_BxM, 1, width).reshape(-1), q_BxHxW, kv_pages_PxSx_C_R)
  o = out[0] if num_splits == 1 else merge_splits(*out)
  return o[:, :h, :c].astype(q_latent_BxHxC.dtype)


def mla_decode_attention(q_latent_BxHxC, q_rope_BxHxR, kv_pages_PxSx_C_R, block_tables_BxM,
                         lengths_B, *, scale, impl="auto", interpret=False, **tuning):
  """Absorbed-MLA decode attention over the paged latent cache; returns o_latent_BxHxC.

  scale: required (the model's softmax scale). impl: "auto" | "reference" |
  "gpu" | "tpu". interpret: run the chosen Pallas kernel in interpret mode
  (True, or TPU `pltpu.InterpretParams`). tuning: pages_per_block, num_splits
  (both kernels), block_h, num_warps, num_stages (GPU); None or absent picks a
  default.
  """
  which = resolve_impl(impl)
  if q_latent_BxHxC.ndim != 3 or q_rope_BxHxR.ndim != 3 or kv_pages_PxSx_C_R.ndim != 3:
    raise ValueError(f"q_latent_BxHxC, q_rope_BxHxR must be [B, H, C], [B, H, R] and "
                     f"kv_pages_PxSx_C_R [P, S, C + R]; got {q_latent_BxHxC.shape}, "
                     f"{q_rope_BxHxR.shape} and {kv_pages_PxSx_C_R.shape}")
  b, h, c = q_latent_BxHxC.shape
  r = q_rope_BxHxR.shape[-1]
  _, s, w = kv_pages_PxSx_C_R.shape
  if q_rope_BxHxR.shape[:2] != (b, h):
    raise ValueError(f"q_rope_BxHxR {q_rope_BxHxR.shape} must be [B={b}, H={h}, R]")
  if w != c + r:
    raise ValueError(f"kv_pages_PxSx_C_R's last axis ({w}) must be C + R = {c} + {r}")
  knobs = check_common(tuning, TUNING, lengths_B, block_tables_BxM, b, scale,
                       q_latent_BxHxC=q_latent_BxHxC, q_rope_BxHxR=q_rope_BxHxR,
                       kv_pages_PxSx_C_R=kv_pages_PxSx_C_R)
  m = block_tables_BxM.shape[1]
  args = (q_latent_BxHxC, q_rope_BxHxR, kv_pages_PxSx_C_R, block_tables_BxM,
          jnp.clip(lengths_B, 0, m * s))
  if which == "reference":
    return mla_decode_attention_reference(*args, scale=float(scale))
  block_h = knobs["block_h"] or min(max(16, pl.next_power_of_2(h)), 32 if c >= 256 else 64)
  if which == "gpu":
    if not (is_pow2(c) and is_pow2(r) and min(c, r) >= 16):
      raise ValueError(f"the GPU kernel needs C and R powers of two >= 16; got C={c}, R={r}")
    if not (is_pow2(block_h) and block_h >= 16):
      raise ValueError(f"block_h={block_h} must be a power of two >= 16")
  tokens = {"gpu": 64, "tpu": 128}[which]
  ppb, splits = block_plan(which, knobs, s, m, q_latent_BxHxC.dtype, tokens,
                           b * pl.cdiv(h, block_h))
  if which == "gpu":
    return _mla_gpu(*args, scale=float(scale), pages_per_block=ppb, num_splits=splits,
                    block_h=block_h, num_warps=knobs["num_warps"] or (8 if c >= 256 else 4),
                    num_stages=knobs["num_stages"] or 2, interpret=interpret)
  return _mla_tpu(*args, scale=float(scale), pages_per_block=ppb, num_splits=splits,
                  interpret=interpret)
