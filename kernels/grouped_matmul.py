"""Grouped matmul: rows grouped by expert, each group times its own matrix.

    out[i] = x[i] @ w[g]     for  start_g <= i < start_g + group_sizes[g]
    out[i] = 0               for  i >= sum(group_sizes)

`jax.lax.ragged_dot` computes exactly this and is a native grouped GEMM on
GPU/TPU. XLA:CPU has none: jax lowers it to X masked dense matmuls, X times
the work (64x at 64 experts). `gmm` therefore splits every group on CPU:

* bucket: its first Z rows go to a dense [X, Z, D] buffer and run as one
  batched matmul (Z = BUCKET_FACTOR x the expected rows per group, like a
  capacity factor of 1.5);
* overflow: its remaining rows are padded to a multiple of J rows (the
  MegaBlocks layout, Gale et al. 2022, sec. 5), so each J-row tile belongs to
  one group, and a `fori_loop` with a data-dependent trip count multiplies
  only the tiles that hold rows:

      tiles used  = sum_g ceil(max(n_g - Z, 0) / J)  <=  ceil(Y / J) + X   (static buffer)
      y[tile p]   = x[tile p] @ w[group(p)]
      dx[tile p]  = dy[tile p] @ w[group(p)]^T,   dw[group(p)] += x[tile p]^T dy[tile p]

  (custom VJP: the backward pass is the same loop; reverse mode only).

Nothing is dropped for any group sizes; balanced groups cost one batched
matmul, and a skewed group costs its overflow tiles. `grouped_mlp` runs
act(x w_in[g]) w_out[g] in that layout, laying the rows out only once.

Shape names (README legend): Y rows, D in features, F out features, X groups
(experts), Z bucket rows per group; here also I tiles, J rows per tile.
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


def tile_plan(sizes_X, group_Y, rank_Y, valid_Y, num_rows: int, tile: int):
  """Tile-padded layout of rows (group g, rank r in the group), groups of
  `sizes_X` rows in group order. Returns (num_tiles static, dst_Y padded row of
  each valid row (num_tiles * tile otherwise), group_I of each tile, tiles_used).
  """
  num_groups = sizes_X.shape[0]
  num_tiles = math.ceil(num_rows / tile) + num_groups
  padded_X = (sizes_X + tile - 1) // tile * tile
  padded_end_X = jnp.cumsum(padded_X)
  dst_Y = jnp.where(valid_Y, (padded_end_X - padded_X)[group_Y] + rank_Y, num_tiles * tile)
  group_I = jnp.minimum(jnp.searchsorted(padded_end_X, jnp.arange(num_tiles) * tile,
                                         side="right"), num_groups - 1)
  return num_tiles, dst_Y, group_I.astype(jnp.int32), padded_end_X[-1] // tile


@jax.custom_vjp
def tile_matmul(x_IxJxD, w_XxDxF, group_I, tiles_used):
  """y[p] = x[p] @ w[group[p]] for p < tiles_used; 0 for the unused tiles."""
  y_IxJxF = jax.lax.full_like(x_IxJxD, 0, shape=x_IxJxD.shape[:2] + w_XxDxF.shape[2:])
  return jax.lax.fori_loop(
      0, tiles_used, lambda p, y: y.at[p].set(x_IxJxD[p] @ w_XxDxF[group_I[p]]), y_IxJxF)


def _tile_matmul_fwd(x_IxJxD, w_XxDxF, group_I, tiles_used):
  return (tile_matmul(x_IxJxD, w_XxDxF, group_I, tiles_used),
          (x_IxJxD, w_XxDxF, group_I, tiles_used))


def _tile_matmul_bwd(res, dy_IxJxF):
  x_IxJxD, w_XxDxF, group_I, tiles_used = res

  def body(p, grads):
    dx, dw = grads
    g = group_I[p]
    return (dx.at[p].set(dy_IxJxF[p] @ w_XxDxF[g].T),
            dw.at[g].add(x_IxJxD[p].T @ dy_IxJxF[p]))

  dx, dw = jax.lax.fori_loop(0, tiles_used, body,
                             (jnp.zeros_like(x_IxJxD), jnp.zeros_like(w_XxDxF)))
  return dx, dw, None, None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


@flax.struct.dataclass
class Layout:
  """Where each of Y rows goes: bucket row (g, c) or overflow tile row (p, t)."""

  bucket_Y: jax.Array      # g * Z + c for bucket rows, X * Z otherwise
  dst_Y: jax.Array         # p * J + t for overflow rows, I * J otherwise
  group_I: jax.Array       # group of each overflow tile
  tiles_used: jax.Array    # overflow tiles holding rows (the loop's trip count)
  num_groups: int = flax.struct.field(pytree_node=False)
  bucket: int = flax.struct.field(pytree_node=False)    # Z
  tile: int = flax.struct.field(pytree_node=False)      # J
  num_tiles: int = flax.struct.field(pytree_node=False)  # I


def layout(group_sizes_X, num_rows: int, expected_rows: int | None = None,
           tile: int | None = None) -> Layout:
  """Z = ceil(BUCKET_FACTOR * expected_rows / X) (default expected_rows = Y),
  J = tile (default ~Z/4, at most 64)."""
  num_groups = group_sizes_X.shape[0]
  bucket = round8(BUCKET_FACTOR * (expected_rows or num_rows) / num_groups)
  t = tile or min(64, round8(bucket / 4))
  sizes_X = group_sizes_X.astype(jnp.int32)
  end_X = jnp.cumsum(sizes_X)
  i_Y = jnp.arange(num_rows, dtype=jnp.int32)
  group_Y = jnp.searchsorted(end_X, i_Y, side="right")         # X: past every group
  in_group_Y = group_Y < num_groups
  g_Y = jnp.minimum(group_Y, num_groups - 1)
  rank_Y = i_Y - (end_X - sizes_X)[g_Y]
  in_bucket_Y = in_group_Y & (rank_Y < bucket)
  num_tiles, dst_Y, group_I, tiles_used = tile_plan(
      jnp.maximum(sizes_X - bucket, 0), g_Y, rank_Y - bucket, in_group_Y & ~in_bucket_Y,
      num_rows, t)
  return Layout(bucket_Y=jnp.where(in_bucket_Y, g_Y * bucket + rank_Y, num_groups * bucket),
                dst_Y=dst_Y, group_I=group_I, tiles_used=tiles_used, num_groups=num_groups,
                bucket=bucket, tile=t, num_tiles=num_tiles)


def to_layout(x_YxD, lay: Layout):
  """Rows -> (x_XxZxD buckets, x_IxJxD overflow tiles); empty slots are 0."""
  k = x_YxD.shape[1]
  x_XZxD = jnp.zeros((lay.num_groups * lay.bucket, k), x_YxD.dtype).at[lay.bucket_Y].set(
      x_YxD, mode="drop", unique_indices=True)
  x_IJxD = jnp.zeros((lay.num_tiles * lay.tile, k), x_YxD.dtype).at[lay.dst_Y].set(
      x_YxD, mode="drop", unique_indices=True)
  return (rearrange(x_XZxD, "(g c) k -> g c k", g=lay.num_groups),
          rearrange(x_IJxD, "(p t) k -> p t k", t=lay.tile))


def from_layout(y_XxZxF, y_IxJxF, lay: Layout):
  """Inverse of `to_layout`: rows in no group come out as 0."""
  y_bucket = rearrange(y_XxZxF, "g c n -> (g c) n").at[lay.bucket_Y].get(
      mode="fill", fill_value=0)
  y_over = rearrange(y_IxJxF, "p t n -> (p t) n").at[lay.dst_Y].get(mode="fill", fill_value=0)
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


def tiled_gmm(x_YxD, w_XxDxF, group_sizes_X, expected_rows: int | None = None,
              tile: int | None = None):
  """The bucket + overflow-tile grouped matmul of the module docstring."""
  x_YxD, (w_XxDxF,) = _same_varying_axes(x_YxD, w_XxDxF)
  lay = layout(group_sizes_X, x_YxD.shape[0], expected_rows, tile)
  x_XxZxD, x_IxJxD = to_layout(x_YxD, lay)
  return from_layout(jnp.einsum("gck,gkn->gcn", x_XxZxD, w_XxDxF),
                     tile_matmul(x_IxJxD, w_XxDxF, lay.group_I, lay.tiles_used), lay)


def grouped_mlp(x_YxD, w_in_XxDxF, w_out_XxFxD, group_sizes_X, act,
                expected_rows: int | None = None, impl: str = "auto"):
  """act(x @ w_in[g]) @ w_out[g] per group: two grouped matmuls. On CPU
  ('tiled') the rows are laid out once for both (and laid back once)."""
  if _resolve(impl) == "ragged":
    h = jax.lax.ragged_dot(x_YxD, w_in_XxDxF, group_sizes_X)
    return jax.lax.ragged_dot(act(h), w_out_XxFxD, group_sizes_X)
  x_YxD, (w_in_XxDxF, w_out_XxFxD) = _same_varying_axes(x_YxD, w_in_XxDxF, w_out_XxFxD)
  lay = layout(group_sizes_X, x_YxD.shape[0], expected_rows)
  x_XxZxD, x_IxJxD = to_layout(x_YxD, lay)
  y_XxZxD = jnp.einsum("gch,ghn->gcn", act(jnp.einsum("gck,gkh->gch", x_XxZxD, w_in_XxDxF)),
                       w_out_XxFxD)
  h_IxJxF = act(tile_matmul(x_IxJxD, w_in_XxDxF, lay.group_I, lay.tiles_used))
  y_IxJxD = tile_matmul(h_IxJxF, w_out_XxFxD, lay.group_I, lay.tiles_used)
  return from_layout(y_XxZxD, y_IxJxD, lay)


def _resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"gmm: impl must be one of {IMPLS} (got {impl!r})")
  if impl == "auto":
    return "tiled" if jax.default_backend() == "cpu" else "ragged"
  return impl


def gmm(x_YxD, w_XxDxF, group_sizes_X, impl: str = "auto",
        expected_rows: int | None = None):
  """Grouped matmul [Y, D] x [X, D, F] -> [Y, F]; 'auto' = ragged_dot except on CPU.

  expected_rows: see `tiled_gmm` (ignored by ragged_dot).
  """
  if _resolve(impl) == "ragged":
    return jax.lax.ragged_dot(x_YxD, w_XxDxF, group_sizes_X)
  return tiled_gmm(x_YxD, w_XxDxF, group_sizes_X, expected_rows)
