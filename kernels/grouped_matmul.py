"""Grouped matmul: rows grouped by expert, each group times its own matrix.

    out[i] = x[i] @ w[g]     for  start_g <= i < start_g + group_sizes[g]
    out[i] = 0               for  i >= sum(group_sizes)

`jax.lax.ragged_dot` computes exactly this and is a native grouped GEMM on
GPU/TPU. XLA:CPU has none: jax lowers it to G masked dense matmuls, G times
the work (64x at 64 experts). `gmm` therefore splits every group on CPU:

* bucket: its first C rows go to a dense [G, C, K] buffer and run as one
  batched matmul (C = BUCKET_FACTOR x the expected rows per group, like a
  capacity factor of 1.5);
* overflow: its remaining rows are padded to a multiple of T rows (the
  MegaBlocks layout, Gale et al. 2022, sec. 5), so each T-row tile belongs to
  one group, and a `fori_loop` with a data-dependent trip count multiplies
  only the tiles that hold rows:

      tiles used  = sum_g ceil(max(n_g - C, 0) / T)  <=  ceil(M / T) + G   (static buffer)
      y[tile p]   = x[tile p] @ w[group(p)]
      dx[tile p]  = dy[tile p] @ w[group(p)]^T,   dw[group(p)] += x[tile p]^T dy[tile p]

  (custom VJP: the backward pass is the same loop; reverse mode only).

Nothing is dropped for any group sizes; balanced groups cost one batched
matmul, and a skewed group costs its overflow tiles. `grouped_mlp` runs
act(x w_in[g]) w_out[g] in that layout, laying the rows out only once.

Shape names: M rows, K in features, N out features, G groups, C bucket rows,
P tiles, T tile rows.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
from einops import rearrange

IMPLS = ("auto", "ragged", "tiled")
BUCKET_FACTOR = 1.5  # bucket rows per group / expected rows per group


def round8(n: float) -> int:
  return max(8, 8 * math.ceil(n / 8))


def tile_plan(sizes_G, group_M, rank_M, valid_M, num_rows: int, tile: int):
  """Tile-padded layout of rows (group g, rank r in the group), groups of
  `sizes_G` rows in group order. Returns (num_tiles static, dst_M padded row of
  each valid row (num_tiles * tile otherwise), group_P of each tile, tiles_used).
  """
  num_groups = sizes_G.shape[0]
  num_tiles = math.ceil(num_rows / tile) + num_groups
  padded_G = (sizes_G + tile - 1) // tile * tile
  padded_end_G = jnp.cumsum(padded_G)
  dst_M = jnp.where(valid_M, (padded_end_G - padded_G)[group_M] + rank_M, num_tiles * tile)
  group_P = jnp.minimum(jnp.searchsorted(padded_end_G, jnp.arange(num_tiles) * tile,
                                         side="right"), num_groups - 1)
  return num_tiles, dst_M, group_P.astype(jnp.int32), padded_end_G[-1] // tile


@jax.custom_vjp
def tile_matmul(x_PxTxK, w_GxKxN, group_P, tiles_used):
  """y[p] = x[p] @ w[group[p]] for p < tiles_used; 0 for the unused tiles."""
  y_PxTxN = jax.lax.full_like(x_PxTxK, 0, shape=x_PxTxK.shape[:2] + w_GxKxN.shape[2:])
  return jax.lax.fori_loop(
      0, tiles_used, lambda p, y: y.at[p].set(x_PxTxK[p] @ w_GxKxN[group_P[p]]), y_PxTxN)


def _tile_matmul_fwd(x_PxTxK, w_GxKxN, group_P, tiles_used):
  return (tile_matmul(x_PxTxK, w_GxKxN, group_P, tiles_used),
          (x_PxTxK, w_GxKxN, group_P, tiles_used))


def _tile_matmul_bwd(res, dy_PxTxN):
  x_PxTxK, w_GxKxN, group_P, tiles_used = res

  def body(p, grads):
    dx, dw = grads
    g = group_P[p]
    return (dx.at[p].set(dy_PxTxN[p] @ w_GxKxN[g].T),
            dw.at[g].add(x_PxTxK[p].T @ dy_PxTxN[p]))

  dx, dw = jax.lax.fori_loop(0, tiles_used, body,
                             (jnp.zeros_like(x_PxTxK), jnp.zeros_like(w_GxKxN)))
  return dx, dw, None, None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


@flax.struct.dataclass
class Layout:
  """Where each of M rows goes: bucket row (g, c) or overflow tile row (p, t)."""

  bucket_M: jax.Array      # g * C + c for bucket rows, G * C otherwise
  dst_M: jax.Array         # p * T + t for overflow rows, P * T otherwise
  group_P: jax.Array       # group of each overflow tile
  tiles_used: jax.Array    # overflow tiles holding rows (the loop's trip count)
  num_groups: int = flax.struct.field(pytree_node=False)
  bucket: int = flax.struct.field(pytree_node=False)    # C
  tile: int = flax.struct.field(pytree_node=False)      # T
  num_tiles: int = flax.struct.field(pytree_node=False)  # P


def layout(group_sizes_G, num_rows: int, expected_rows: int | None = None,
           tile: int | None = None) -> Layout:
  """C = ceil(BUCKET_FACTOR * expected_rows / G) (default expected_rows = M),
  T = tile (default ~C/4, at most 64)."""
  num_groups = group_sizes_G.shape[0]
  bucket = round8(BUCKET_FACTOR * (expected_rows or num_rows) / num_groups)
  t = tile or min(64, round8(bucket / 4))
  sizes_G = group_sizes_G.astype(jnp.int32)
  end_G = jnp.cumsum(sizes_G)
  i_M = jnp.arange(num_rows, dtype=jnp.int32)
  group_M = jnp.searchsorted(end_G, i_M, side="right")         # G: past every group
  in_group_M = group_M < num_groups
  g_M = jnp.minimum(group_M, num_groups - 1)
  rank_M = i_M - (end_G - sizes_G)[g_M]
  in_bucket_M = in_group_M & (rank_M < bucket)
  num_tiles, dst_M, group_P, tiles_used = tile_plan(
      jnp.maximum(sizes_G - bucket, 0), g_M, rank_M - bucket, in_group_M & ~in_bucket_M,
      num_rows, t)
  return Layout(bucket_M=jnp.where(in_bucket_M, g_M * bucket + rank_M, num_groups * bucket),
                dst_M=dst_M, group_P=group_P, tiles_used=tiles_used, num_groups=num_groups,
                bucket=bucket, tile=t, num_tiles=num_tiles)


def to_layout(x_MxK, lay: Layout):
  """Rows -> (x_GxCxK buckets, x_PxTxK overflow tiles); empty slots are 0."""
  k = x_MxK.shape[1]
  x_GCxK = jnp.zeros((lay.num_groups * lay.bucket, k), x_MxK.dtype).at[lay.bucket_M].set(
      x_MxK, mode="drop", unique_indices=True)
  x_PTxK = jnp.zeros((lay.num_tiles * lay.tile, k), x_MxK.dtype).at[lay.dst_M].set(
      x_MxK, mode="drop", unique_indices=True)
  return (rearrange(x_GCxK, "(g c) k -> g c k", g=lay.num_groups),
          rearrange(x_PTxK, "(p t) k -> p t k", t=lay.tile))


def from_layout(y_GxCxN, y_PxTxN, lay: Layout):
  """Inverse of `to_layout`: rows in no group come out as 0."""
  y_bucket = rearrange(y_GxCxN, "g c n -> (g c) n").at[lay.bucket_M].get(
      mode="fill", fill_value=0)
  y_over = rearrange(y_PxTxN, "p t n -> (p t) n").at[lay.dst_M].get(mode="fill", fill_value=0)
  return y_bucket + y_over


def _same_varying_axes(x, *ws):
  """Inside shard_map, loop carries must vary over the same mesh axes as the
  products: give x and the weights each other's by adding a scalar 0. Skipped
  when they already agree (always outside shard_map): the add copies w."""
  zeros = [jax.lax.full_like(a, 0, shape=()) for a in (x, *ws)]
  if all(jax.typeof(z) == jax.typeof(zeros[0]) for z in zeros[1:]):
    return x, list(ws)
  for z in zeros[1:]:
    x = x + z
  return x, [w + zeros[0] for w in ws]


def tiled_gmm(x_MxK, w_GxKxN, group_sizes_G, expected_rows: int | None = None,
              tile: int | None = None):
  """The bucket + overflow-tile grouped matmul of the module docstring."""
  x_MxK, (w_GxKxN,) = _same_varying_axes(x_MxK, w_GxKxN)
  lay = layout(group_sizes_G, x_MxK.shape[0], expected_rows, tile)
  x_GxCxK, x_PxTxK = to_layout(x_MxK, lay)
  return from_layout(jnp.einsum("gck,gkn->gcn", x_GxCxK, w_GxKxN),
                     tile_matmul(x_PxTxK, w_GxKxN, lay.group_P, lay.tiles_used), lay)


def grouped_mlp(x_MxK, w_in_GxKxH, w_out_GxHxN, group_sizes_G, act,
                expected_rows: int | None = None, impl: str = "auto"):
  """act(x @ w_in[g]) @ w_out[g] per group: two grouped matmuls. On CPU
  ('tiled') the rows are laid out once for both (and laid back once)."""
  if _resolve(impl) == "ragged":
    h = jax.lax.ragged_dot(x_MxK, w_in_GxKxH, group_sizes_G)
    return jax.lax.ragged_dot(act(h), w_out_GxHxN, group_sizes_G)
  x_MxK, (w_in_GxKxH, w_out_GxHxN) = _same_varying_axes(x_MxK, w_in_GxKxH, w_out_GxHxN)
  lay = layout(group_sizes_G, x_MxK.shape[0], expected_rows)
  x_GxCxK, x_PxTxK = to_layout(x_MxK, lay)
  y_GxCxN = jnp.einsum("gch,ghn->gcn", act(jnp.einsum("gck,gkh->gch", x_GxCxK, w_in_GxKxH)),
                       w_out_GxHxN)
  h_PxTxH = act(tile_matmul(x_PxTxK, w_in_GxKxH, lay.group_P, lay.tiles_used))
  y_PxTxN = tile_matmul(h_PxTxH, w_out_GxHxN, lay.group_P, lay.tiles_used)
  return from_layout(y_GxCxN, y_PxTxN, lay)


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"gmm: impl must be one of {IMPLS} (got {impl!r})")
  if impl == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged"
  return impl


def gmm(x_MxK, w_GxKxN, group_sizes_G, impl: str = "auto",
        expected_rows: int | None = None):
  """Grouped matmul [M, K] x [G, K, N] -> [M, N]; 'auto' = ragged_dot except on CPU.

  expected_rows: see `tiled_gmm` (ignored by ragged_dot).
  """
  if _resolve(impl) == "ragged":
    return jax.lax.ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
  return tiled_gmm(x_MxK, w_GxKxN, group_sizes_G, expected_rows)
