"""Grouped matmul: rows grouped by expert, each group times its own matrix.

    out[i] = x[i] @ w[g]     for  start_g <= i < start_g + group_sizes[g]
    out[i] = 0               for  i >= sum(group_sizes)

`jax.lax.ragged_dot` computes exactly this and is a native grouped GEMM on
GPU/TPU. XLA:CPU has none: jax lowers it to G masked dense matmuls, G times
the work (64x at 64 experts). `gmm` therefore uses a tiled loop on CPU
(the MegaBlocks layout, Gale et al. 2022, sec. 5): every group is padded to a
multiple of T rows, so each T-row tile belongs to one group, and a
`fori_loop` with a data-dependent trip count multiplies only the tiles that
hold rows:

    tiles used  = sum_g ceil(n_g / T)  <=  ceil(M / T) + G   (the static buffer)
    y[tile p]   = x[tile p] @ w[group(p)]
    dx[tile p]  = dy[tile p] @ w[group(p)]^T,   dw[group(p)] += x[tile p]^T dy[tile p]

The backward pass is the same loop (custom VJP; reverse mode only). Padding
costs at most G (T - 1) extra rows; T is about half the mean group size.

Shape names: M rows, K in features, N out features, G groups, P tiles, T tile rows.
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange

IMPLS = ("auto", "ragged", "tiled")


def tile_rows(num_rows: int, num_groups: int, max_tile: int = 64) -> int:
  """T: about half the mean group size, a multiple of 8, in [8, max_tile]."""
  return min(max_tile, max(8, 8 * math.ceil(num_rows / num_groups / 16)))


def tile_plan(group_sizes_G, num_rows: int, tile: int):
  """Where the rows go in the tile-padded layout.

  Returns (num_tiles static, dst_M padded row of each row (num_tiles * tile
  for rows in no group), group_P of each tile, tiles_used).
  """
  num_groups = group_sizes_G.shape[0]
  num_tiles = math.ceil(num_rows / tile) + num_groups
  sizes_G = group_sizes_G.astype(jnp.int32)
  padded_G = (sizes_G + tile - 1) // tile * tile
  end_G, padded_end_G = jnp.cumsum(sizes_G), jnp.cumsum(padded_G)
  i_M = jnp.arange(num_rows, dtype=jnp.int32)
  group_M = jnp.searchsorted(end_G, i_M, side="right")       # G: past every group
  g_M = jnp.minimum(group_M, num_groups - 1)
  dst_M = jnp.where(group_M < num_groups,
                    i_M - (end_G - sizes_G)[g_M] + (padded_end_G - padded_G)[g_M],
                    num_tiles * tile)
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


def tiled_gmm(x_MxK, w_GxKxN, group_sizes_G, tile: int | None = None):
  """The tiled grouped matmul described in the module docstring."""
  m = x_MxK.shape[0]
  t = tile or tile_rows(m, w_GxKxN.shape[0])
  num_tiles, dst_M, group_P, tiles_used = tile_plan(group_sizes_G, m, t)
  # Inside shard_map the loop carries must vary over the same mesh axes as the
  # products: give x and w each other's (adding a scalar 0; no-op elsewhere).
  x_MxK, w_GxKxN = (x_MxK + jax.lax.full_like(w_GxKxN, 0, shape=()),
                    w_GxKxN + jax.lax.full_like(x_MxK, 0, shape=()))
  x_PTxK = jnp.zeros((num_tiles * t, x_MxK.shape[1]), x_MxK.dtype).at[dst_M].set(
      x_MxK, mode="drop", unique_indices=True)
  y_PxTxN = tile_matmul(rearrange(x_PTxK, "(p t) k -> p t k", t=t), w_GxKxN, group_P,
                        tiles_used)
  return rearrange(y_PxTxN, "p t n -> (p t) n").at[dst_M].get(mode="fill", fill_value=0)


def gmm(x_MxK, w_GxKxN, group_sizes_G, impl: str = "auto"):
  """Grouped matmul [M, K] x [G, K, N] -> [M, N]; 'auto' = ragged_dot except on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"gmm: impl must be one of {IMPLS} (got {impl!r})")
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged"
  if impl == "ragged":
    return jax.lax.ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
  return tiled_gmm(x_MxK, w_GxKxN, group_sizes_G, None)
