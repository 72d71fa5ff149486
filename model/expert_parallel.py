"""Expert parallelism: the MoE dispatch inside `jax.shard_map`.

Mesh axes (see train/mesh.py): tokens are sharded over *every* mesh axis
(`token_axes`, S = product of their sizes shards), the experts over the
`expert` axis (X shards of E_loc = E / X experts each; replicated across the
other axes). Shard s = (r, x) holds N_loc = N / S tokens and experts
[x E_loc, (x+1) E_loc). Tokens only travel inside their row of X devices
along the `expert` axis:

    route locally -> all_to_all(expert) -> grouped expert FFN -> all_to_all(expert)
    -> combine locally

Capacity dispatch (`moe_dispatch='capacity'`) -- identical to the
single-device `capacity_moe` on the global batch, drops included:
  * C = ceil(k N cf / E) from the *global* token count N.
  * The global slot of assignment (n, j) -> e keeps the single-device priority
    (every first choice before any second choice, then token order, with
    shards in mesh order):

        slot = sum_{j' < j} count[j', e] + sum_{s' < s} count_{s'}[j, e] + local rank

    count_s[j, e] (tokens of shard s whose j-th choice is e) is all-gathered
    over the token axes; kept iff slot < C.
  * For a fixed e, global slots increase along the local priority order, so the
    kept assignments of a shard are a prefix of it; their local rank (< C and
    < N_loc, a token picks e at most once) indexes a fixed buffer
    [E, Cs, D] with Cs = min(C, N_loc). Nothing can overflow these buffers,
    so EP drops exactly what one device drops. The price of exactness: the
    buffers are sized for one shard sending an expert's whole capacity.

Dropless dispatch (`moe_dispatch='dropless'`): each shard sorts its N_loc k
assignments by expert; the rows for peer x are contiguous. A peer receives at
most Cp = N_loc min(k, E_loc) rows from one source, so the receive buffer is
[X Cp, D] with source x' at rows [x' Cp, x' Cp + n_x'). The exchange is
  * 'ragged': `jax.lax.ragged_all_to_all` sends only the real rows (GPU/TPU;
    XLA:CPU does not implement it),
  * 'padded': `jax.lax.all_to_all` of fixed [X, Cp, D] buffers (any backend).
Both give the same layout; the receiver sorts its rows by local expert
(padding last) and runs the grouped matmul (`grouped_ffn`).

Routing statistics are means over tokens, so the global RouterStats are the
`pmean` over the token axes of the per-shard ones (equal shard sizes); the
dropped fraction likewise. Gradients of the replicated-over-`data` expert
weights are summed over `data` by shard_map's transpose.

Shape names: N_loc local tokens (written N below), D width, E experts, K top-k,
X expert-axis size, S token shards, C capacity, M = N K assignments.
"""

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec as P

from model.dispatch import (capacity_slots, choice_counts, combine, expert_capacity,
                            expert_ffn, gather_from_experts, grouped_ffn,
                            scatter_to_experts, sort_by_expert)
from model.router import Routing
from model.routing_losses import RouterStats, router_stats

EXPERT_AXIS = "expert"
EXCHANGES = ("auto", "ragged", "padded")


def expert_axis_size(mesh) -> int:
  """Size of the mesh's `expert` axis (1 when absent or no mesh)."""
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[EXPERT_AXIS]


def resolve_exchange(exchange: str) -> str:
  """'auto' -> 'ragged' where XLA implements ragged_all_to_all, else 'padded'."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert_parallel: exchange must be one of {EXCHANGES} (got {exchange!r})")
  if exchange == "auto":
    return "padded" if jax.default_backend() == "cpu" else "ragged"
  return exchange


def _global_stats(routing: Routing, dropped, token_axes) -> RouterStats:
  """RouterStats of the global batch: pmean of the (equal-sized) shards' means."""
  return jax.lax.pmean(router_stats(routing, dropped), token_axes)


def _capacity_body(x_NxD, routing: Routing, w_in, w_out, *, token_axes, factor: float):
  """Per-shard capacity dispatch; see the module docstring."""
  n, k = routing.expert_NxK.shape
  num_experts = routing.probs_NxE.shape[-1]
  x_size = jax.lax.axis_size(EXPERT_AXIS)
  num_shards = jax.lax.axis_size(token_axes)
  capacity = expert_capacity(n * num_shards, num_experts, k, factor)
  expert_NxK = routing.expert_NxK

  # Global slot: offsets of this shard's (choice, expert) runs in the global order.
  count_KxE = choice_counts(expert_NxK, num_experts)
  count_SxKxE = jax.lax.all_gather(count_KxE, token_axes)
  total_KxE = count_SxKxE.sum(0)
  before_choice_KxE = jnp.cumsum(total_KxE, axis=0) - total_KxE
  before_shard_SxKxE = jnp.cumsum(count_SxKxE, axis=0) - count_SxKxE
  offset_KxE = before_choice_KxE + before_shard_SxKxE[jax.lax.axis_index(token_axes)]
  _, kept_NxK = capacity_slots(expert_NxK, num_experts, capacity, offset_KxE)
  # Buffer position: the local rank (kept assignments are a prefix of it).
  rank_NxK, _ = capacity_slots(expert_NxK, num_experts, capacity)
  buf_capacity = min(capacity, n)

  x_ExCxD = scatter_to_experts(x_NxD, expert_NxK, rank_NxK, kept_NxK, num_experts,
                               buf_capacity)
  recv_ExCxD = jax.lax.all_to_all(x_ExCxD, EXPERT_AXIS, 0, 0, tiled=True)
  recv_ElxXCxD = rearrange(recv_ExCxD, "(x e) c d -> e (x c) d", x=x_size)
  y_ElxXCxD = expert_ffn(recv_ElxXCxD, w_in, w_out)
  y_ExCxD = rearrange(y_ElxXCxD, "e (x c) d -> (x e) c d", x=x_size)
  back_ExCxD = jax.lax.all_to_all(y_ExCxD, EXPERT_AXIS, 0, 0, tiled=True)
  y_NxKxD = gather_from_experts(back_ExCxD, expert_NxK, rank_NxK, kept_NxK)
  y_NxD = combine(y_NxKxD, routing.gate_NxK, kept_NxK)
  dropped = 1.0 - kept_NxK.mean(dtype=jnp.float32)
  return y_NxD, _global_stats(routing, dropped, token_axes)


def _exchange(rows_MxD, out_rows: int, in_offsets_X, send_sizes_X, out_offsets_X,
              recv_sizes_X, peer_X, chunk: int, exchange: str):
  """Sends rows [in_offsets[x], +send_sizes[x]) to peer x, landing at
  out_offsets[x] there; receives recv_sizes[x] rows from peer x.

  'padded' packs each peer's rows into a fixed [X, chunk] buffer, all_to_all's
  it and places the received chunks at `peer_X` rows of the output.
  Returns the [out_rows, D] output buffer (zeros where nothing arrived).
  """
  d = rows_MxD.shape[-1]
  out_MxD = jnp.zeros((out_rows, d), rows_MxD.dtype)
  if exchange == "ragged":
    return jax.lax.ragged_all_to_all(rows_MxD, out_MxD, in_offsets_X, send_sizes_X,
                                     out_offsets_X, recv_sizes_X, axis_name=EXPERT_AXIS)
  x_size = send_sizes_X.shape[0]
  # Row i of peer x's chunk in the send buffer: rows_MxD[in_offsets[x] + i].
  i_C = jnp.arange(chunk)
  src_XxC = in_offsets_X[:, None] + i_C
  valid_XxC = i_C < send_sizes_X[:, None]
  send_XxCxD = jnp.where(valid_XxC[..., None],
                         rows_MxD.at[src_XxC].get(mode="fill", fill_value=0), 0)
  recv_XxCxD = jax.lax.all_to_all(send_XxCxD, EXPERT_AXIS, 0, 0, tiled=True)
  # Chunk from peer x lands at rows peer_X[x] + i of the output.
  dst_XxC = jnp.where(i_C < recv_sizes_X[:, None], peer_X[:, None] + i_C, out_rows)
  return out_MxD.at[dst_XxC.reshape(-1)].set(
      rearrange(recv_XxCxD, "x c d -> (x c) d"), mode="drop", unique_indices=True)


def _dropless_body(x_NxD, routing: Routing, w_in, w_out, *, token_axes, exchange: str):
  """Per-shard dropless dispatch; see the module docstring."""
  n, k = routing.expert_NxK.shape
  num_experts = routing.probs_NxE.shape[-1]
  local_experts = w_in.shape[0]
  x_size = jax.lax.axis_size(EXPERT_AXIS)
  me = jax.lax.axis_index(EXPERT_AXIS)
  chunk = n * min(k, local_experts)             # Cp: most rows one peer sends another
  order_M, count_E = sort_by_expert(routing.expert_NxK, num_experts)
  x_sorted_MxD = x_NxD[order_M // k]

  # count_XxE[x, e]: assignments of peer x (same data row) to expert e.
  count_XxE = jax.lax.all_gather(count_E, EXPERT_AXIS)
  count_XxXxEl = rearrange(count_XxE, "src (dst el) -> src dst el", dst=x_size)
  sent_XxX = count_XxXxEl.sum(-1)                # [src, dst] rows
  start_XxX = jnp.cumsum(sent_XxX, axis=1) - sent_XxX  # src's offset of its chunk to dst
  send_X, recv_X = sent_XxX[me], sent_XxX[:, me]
  recv_XxEl = count_XxXxEl[:, me]
  src_slot_X = jnp.arange(x_size, dtype=jnp.int32) * chunk  # receiver rows of source x

  recv_rows = x_size * chunk
  x_recv_RxD = _exchange(x_sorted_MxD, recv_rows, start_XxX[me], send_X,
                         jnp.full((x_size,), me * chunk, jnp.int32), recv_X,
                         src_slot_X, chunk, exchange)

  # Local expert of each received row (local_experts = padding), then group by it.
  ends_XxEl = jnp.cumsum(recv_XxEl, axis=1)
  i_C = jnp.arange(chunk)
  local_XxC = (i_C[None, :, None] >= ends_XxEl[:, None, :]).sum(-1)
  order_R, _ = sort_by_expert(local_XxC.reshape(-1, 1), local_experts + 1)
  y_grouped_RxD = grouped_ffn(x_recv_RxD[order_R], w_in, w_out, recv_XxEl.sum(0),
                              expected_rows=n * k)  # the mean; the rest is padding
  y_recv_RxD = jnp.zeros_like(y_grouped_RxD).at[order_R].set(y_grouped_RxD,
                                                               unique_indices=True)

  # Back to the senders, landing where each sender's chunk to `me` started.
  y_sorted_MxD = _exchange(y_recv_RxD, n * k, src_slot_X, recv_X, start_XxX[:, me], send_X,
                           start_XxX[me], chunk, exchange)
  y_MxD = jnp.zeros_like(y_sorted_MxD).at[order_M].set(y_sorted_MxD, unique_indices=True)
  y_NxD = combine(rearrange(y_MxD, "(n k) d -> n k d", k=k), routing.gate_NxK)
  return y_NxD, _global_stats(routing, 0.0, token_axes)


def expert_parallel_moe(x_NxD, routing: Routing, w_in_ExDx2F, w_out_ExFxD, mesh, *,
                        dispatch: str, capacity_factor: float, exchange: str = "auto"):
  """MoE experts on `mesh` with expert parallelism. Returns (y_NxD, RouterStats).

  x_NxD and the routing arrays are global (sharded over all mesh axes on N by
  the shard_map); w_in/w_out are the global [E, ...] weights (sharded over the
  `expert` axis). The stats are over the global batch.
  """
  token_axes = tuple(mesh.axis_names)
  x_size = expert_axis_size(mesh)
  num_experts = w_in_ExDx2F.shape[0]
  if num_experts % x_size:
    raise ValueError(f"expert_parallel: num_experts={num_experts} is not divisible by the "
                     f"'{EXPERT_AXIS}' mesh axis of size {x_size}")
  if x_NxD.shape[0] % mesh.size:
    raise ValueError(f"expert_parallel: {x_NxD.shape[0]} tokens cannot be split evenly over "
                     f"{mesh.size} devices (mesh {dict(mesh.shape)})")
  if dispatch == "capacity":
    body = lambda x, r, wi, wo: _capacity_body(x, r, wi, wo, token_axes=token_axes,
                                               factor=capacity_factor)
  elif dispatch == "dropless":
    body = lambda x, r, wi, wo: _dropless_body(x, r, wi, wo, token_axes=token_axes,
                                               exchange=resolve_exchange(exchange))
  else:
    raise ValueError(f"expert_parallel: unknown dispatch {dispatch!r}")
  tok = P(token_axes)
  return jax.shard_map(
      body, mesh=mesh,
      in_specs=(tok, jax.tree.map(lambda _: tok, routing), P(EXPERT_AXIS), P(EXPERT_AXIS)),
      out_specs=(tok, P()))(x_NxD, routing, w_in_ExDx2F, w_out_ExFxD)
