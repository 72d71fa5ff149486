"""Grouped matmul: rows grouped by expert, each group times its own matrix.

    out[i] = x[i] @ w[g]     for  start_g <= i < start_g + group_sizes[g]
    out[i] = 0               for  i >= sum(group_sizes)

`jax.lax.ragged_dot` computes exactly this and is a native grouped GEMM on
GPU/TPU. XLA:CPU has none: jax lowers it to G masked dense matmuls, G times
the work (64x at 64 experts). `gmm` therefore uses a tiled formulation on
CPU (MegaBlocks, Gale et al. 2022, sec. 5): every group is padded to a
multiple of T rows, so each T-row tile belongs to one group, and the tiles run
as one batched matmul against their groups' matrices:

    tiles <= ceil(M / T) + G      (static bound: sum_g ceil(n_g / T) <= M / T + G)
    y_tiles[t] = x_tiles[t] @ w[group(t)]

At most G (T - 1) padding rows are computed, and the gathered weights cost
tiles x K x N memory traffic. Both are differentiable (gathers/scatters).

Shape names: M rows, K in features, N out features, G groups, T tile rows.
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange

IMPLS = ("auto", "ragged", "tiled")


def tile_rows(num_rows: int, num_groups: int, max_tile: int = 128) -> int:
  """T: about the mean group size, a multiple of 8, in [8, max_tile]."""
  return min(max_tile, max(8, 8 * math.ceil(num_rows / num_groups / 8)))


def tiled_gmm(x_MxK, w_GxKxN, group_sizes_G, tile: int | None = None):
  """The tiled grouped matmul described in the module docstring."""
  m, num_groups = x_MxK.shape[0], w_GxKxN.shape[0]
  t = tile or tile_rows(m, num_groups)
  num_tiles = math.ceil(m / t) + num_groups
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  padded_G = (group_sizes_G + t - 1) // t * t
  end_G, padded_end_G = jnp.cumsum(group_sizes_G), jnp.cumsum(padded_G)
  # Row i of group g moves to padded row (padded start of g) + (i - start of g).
  i_M = jnp.arange(m, dtype=jnp.int32)
  group_M = jnp.searchsorted(end_G, i_M, side="right")        # G: past every group
  in_group_M = group_M < num_groups
  g_M = jnp.minimum(group_M, num_groups - 1)
  dst_M = jnp.where(in_group_M, i_M - (end_G - group_sizes_G)[g_M]
                    + (padded_end_G - padded_G)[g_M], num_tiles * t)
  x_PxK = jnp.zeros((num_tiles * t, x_MxK.shape[1]), x_MxK.dtype).at[dst_M].set(
      x_MxK, mode="drop", unique_indices=True)
  tile_group = jnp.minimum(jnp.searchsorted(padded_end_G, jnp.arange(num_tiles) * t,
                                            side="right"), num_groups - 1)
  y_TxTxN = jnp.einsum("ptk,pkn->ptn", rearrange(x_PxK, "(p t) k -> p t k", t=t),
                       w_GxKxN[tile_group])
  return rearrange(y_TxTxN, "p t n -> (p t) n").at[dst_M].get(mode="fill", fill_value=0)


def gmm(x_MxK, w_GxKxN, group_sizes_G, impl: str = "auto"):
  """Grouped matmul [M, K] x [G, K, N] -> [M, N]; 'auto' = ragged_dot except on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"gmm: impl must be one of {IMPLS} (got {impl!r})")
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged"
  if impl == "ragged":
    return jax.lax.ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
  return tiled_gmm(x_MxK, w_GxKxN, group_sizes_G)
