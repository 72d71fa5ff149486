"""Expert parallelism: the MoE dispatch inside `jax.shard_map`.

Mesh axes (see train/mesh.py): tokens are sharded over *every* mesh axis
(`token_axes`, I = product of their sizes shards), the experts over the
`expert` axis (Q peers of Xl = X / Q experts each; replicated across the
other axes). Shard i = (r, q) holds N_loc = N / I tokens and experts
[q Xl, (q+1) Xl). Tokens only travel inside their row of Q devices
along the `expert` axis:

    route locally -> all_to_all(expert) -> grouped expert FFN -> all_to_all(expert)
    -> combine locally

Capacity dispatch (`moe_dispatch='capacity'`) -- identical to the
single-device `capacity_moe` on the global batch, drops included:
  * Z = ceil(A N cf / X) from the *global* token count N.
  * The global slot of assignment (n, j) -> e keeps the single-device priority
    (every first choice before any second choice, then token order, with
    shards in mesh order):

        slot = sum_{j' < j} count[j', e] + sum_{i' < i} count_{i'}[j, e] + local rank

    count_i[j, e] (tokens of shard i whose j-th choice is e) is all-gathered
    over the token axes; kept iff slot < Z.
  * For a fixed e, global slots increase along the local priority order, so the
    kept assignments of a shard are a prefix of it; their local rank (< Z and
    < N_loc, a token picks e at most once) indexes a fixed buffer
    [X, Zs, D] with Zs = min(Z, N_loc). Nothing can overflow these buffers,
    so EP drops exactly what one device drops. The price of exactness: the
    buffers are sized for one shard sending an expert's whole capacity.

Dropless dispatch (`moe_dispatch='dropless'`): each shard sorts its N_loc A
assignments by expert; the rows for peer q are contiguous. A peer receives at
most J = N_loc min(A, Xl) rows from one source, so the receive buffer is
[Q J, D] with source q' at rows [q' J, q' J + n_q'). The exchange is
  * 'ragged': `jax.lax.ragged_all_to_all` sends only the real rows (GPU/TPU;
    XLA:CPU does not implement it),
  * 'padded': `jax.lax.all_to_all` of fixed [Q, J, D] buffers (any backend).
Both give the same layout; the receiver sorts its rows by local expert
(padding last) and runs the grouped matmul (`grouped_ffn`).

Routing statistics are means over tokens, so the global RouterStats are the
`pmean` over the token axes of the per-shard ones (equal shard sizes); the
dropped fraction likewise. Gradients of the replicated-over-`data` expert
weights are summed over `data` by shard_map's transpose.

Shape names (README legend): N_loc local tokens (written N below), D width,
X experts, A top-k, Z capacity, Y = N A assignments; here also Q peers on the
`expert` axis, Xl = X / Q local experts, I token shards, J rows one peer
sends another (dropless).
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
  n, k = routing.expert_NxA.shape
  num_experts = routing.probs_NxX.shape[-1]
  x_size = jax.lax.axis_size(EXPERT_AXIS)
  num_shards = jax.lax.axis_size(token_axes)
  capacity = expert_capacity(n * num_shards, num_experts, k, factor)
  expert_NxA = routing.expert_NxA

  # Global slot: offsets of this shard's (choice, expert) runs in the global order.
  count_AxX = choice_counts(expert_NxA, num_experts)
  count_IxAxX = jax.lax.all_gather(count_AxX, token_axes)
  total_AxX = count_IxAxX.sum(0)
  before_choice_AxX = jnp.cumsum(total_AxX, axis=0) - total_AxX
  before_shard_IxAxX = jnp.cumsum(count_IxAxX, axis=0) - count_IxAxX
  offset_AxX = before_choice_AxX + before_shard_IxAxX[jax.lax.axis_index(token_axes)]
  _, kept_NxA = capacity_slots(expert_NxA, num_experts, capacity, offset_AxX)
  # Buffer position: the local rank (kept assignments are a prefix of it).
  rank_NxA, _ = capacity_slots(expert_NxA, num_experts, capacity)
  buf_capacity = min(capacity, n)

  x_XxZxD = scatter_to_experts(x_NxD, expert_NxA, rank_NxA, kept_NxA, num_experts,
                               buf_capacity)
  recv_XxZxD = jax.lax.all_to_all(x_XxZxD, EXPERT_AXIS, 0, 0, tiled=True)
  recv_XlxQZxD = rearrange(recv_XxZxD, "(x e) c d -> e (x c) d", x=x_size)
  y_XlxQZxD = expert_ffn(recv_XlxQZxD, w_in, w_out)
  y_XxZxD = rearrange(y_XlxQZxD, "e (x c) d -> (x e) c d", x=x_size)
  back_XxZxD = jax.lax.all_to_all(y_XxZxD, EXPERT_AXIS, 0, 0, tiled=True)
  y_NxAxD = gather_from_experts(back_XxZxD, expert_NxA, rank_NxA, kept_NxA)
  y_NxD = combine(y_NxAxD, routing.gate_NxA, kept_NxA)
  dropped = 1.0 - kept_NxA.mean(dtype=jnp.float32)
  return y_NxD, _global_stats(routing, dropped, token_axes)


def _exchange(rows_YxD, out_rows: int, in_offsets_Q, send_sizes_Q, out_offsets_Q,
              recv_sizes_Q, peer_Q, chunk: int, exchange: str):
  """Sends rows [in_offsets[x], +send_sizes[x]) to peer x, landing at
  out_offsets[x] there; receives recv_sizes[x] rows from peer x.

  'padded' packs each peer's rows into a fixed [Q, J] buffer, all_to_all's
  it and places the received chunks at `peer_Q` rows of the output.
  Returns the [out_rows, D] output buffer (zeros where nothing arrived).
  """
  d = rows_YxD.shape[-1]
  out_YxD = jnp.zeros((out_rows, d), rows_YxD.dtype)
  if exchange == "ragged":
    return jax.lax.ragged_all_to_all(rows_YxD, out_YxD, in_offsets_Q, send_sizes_Q,
                                     out_offsets_Q, recv_sizes_Q, axis_name=EXPERT_AXIS)
  x_size = send_sizes_Q.shape[0]
  # Row i of peer x's chunk in the send buffer: rows_YxD[in_offsets[x] + i].
  i_J = jnp.arange(chunk)
  src_QxJ = in_offsets_Q[:, None] + i_J
  valid_QxJ = i_J < send_sizes_Q[:, None]
  send_QxJxD = jnp.where(valid_QxJ[..., None],
                         rows_YxD.at[src_QxJ].get(mode="fill", fill_value=0), 0)
  recv_QxJxD = jax.lax.all_to_all(send_QxJxD, EXPERT_AXIS, 0, 0, tiled=True)
  # Chunk from peer x lands at rows peer_Q[x] + i of the output.
  dst_QxJ = jnp.where(i_J < recv_sizes_Q[:, None], peer_Q[:, None] + i_J, out_rows)
  return out_YxD.at[dst_QxJ.reshape(-1)].set(
      rearrange(recv_QxJxD, "x c d -> (x c) d"), mode="drop", unique_indices=True)


def _dropless_body(x_NxD, routing: Routing, w_in, w_out, *, token_axes, exchange: str):
  """Per-shard dropless dispatch; see the module docstring."""
  n, k = routing.expert_NxA.shape
  num_experts = routing.probs_NxX.shape[-1]
  local_experts = w_in.shape[0]
  x_size = jax.lax.axis_size(EXPERT_AXIS)
  me = jax.lax.axis_index(EXPERT_AXIS)
  chunk = n * min(k, local_experts)             # J: most rows one peer sends another
  order_Y, count_X = sort_by_expert(routing.expert_NxA, num_experts)
  x_sorted_YxD = x_NxD[order_Y // k]

  # count_QxX[q, e]: assignments of peer q (same data row) to expert e.
  count_QxX = jax.lax.all_gather(count_X, EXPERT_AXIS)
  count_QxQxXl = rearrange(count_QxX, "src (dst el) -> src dst el", dst=x_size)
  sent_QxQ = count_QxQxXl.sum(-1)                # [src, dst] rows
  start_QxQ = jnp.cumsum(sent_QxQ, axis=1) - sent_QxQ  # src's offset of its chunk to dst
  send_Q, recv_Q = sent_QxQ[me], sent_QxQ[:, me]
  recv_QxXl = count_QxQxXl[:, me]
  src_slot_Q = jnp.arange(x_size, dtype=jnp.int32) * chunk  # receiver rows of source x

  recv_rows = x_size * chunk
  x_recv_QJxD = _exchange(x_sorted_YxD, recv_rows, start_QxQ[me], send_Q,
                         jnp.full((x_size,), me * chunk, jnp.int32), recv_Q,
                         src_slot_Q, chunk, exchange)

  # Local expert of each received row (local_experts = padding), then group by it.
  ends_QxXl = jnp.cumsum(recv_QxXl, axis=1)
  i_J = jnp.arange(chunk)
  local_QxJ = (i_J[None, :, None] >= ends_QxXl[:, None, :]).sum(-1)
  order_QJ, _ = sort_by_expert(local_QxJ.reshape(-1, 1), local_experts + 1)
  y_grouped_QJxD = grouped_ffn(x_recv_QJxD[order_QJ], w_in, w_out, recv_QxXl.sum(0),
                              expected_rows=n * k)  # the mean; the rest is padding
  y_recv_QJxD = jnp.zeros_like(y_grouped_QJxD).at[order_QJ].set(y_grouped_QJxD,
                                                               unique_indices=True)

  # Back to the senders, landing where each sender's chunk to `me` started.
  y_sorted_YxD = _exchange(y_recv_QJxD, n * k, src_slot_Q, recv_Q, start_QxQ[:, me], send_Q,
                           start_QxQ[me], chunk, exchange)
  y_YxD = jnp.zeros_like(y_sorted_YxD).at[order_Y].set(y_sorted_YxD, unique_indices=True)
  y_NxD = combine(rearrange(y_YxD, "(n k) d -> n k d", k=k), routing.gate_NxA)
  return y_NxD, _global_stats(routing, 0.0, token_axes)


def expert_parallel_moe(x_NxD, routing: Routing, w_in_XxDx2F, w_out_XxFxD, mesh, *,
                        dispatch: str, capacity_factor: float, exchange: str = "auto"):
  """MoE experts on `mesh` with expert parallelism. Returns (y_NxD, RouterStats).

  x_NxD and the routing arrays are global (sharded over all mesh axes on N by
  the shard_map); w_in/w_out are the global [X, ...] weights (sharded over the
  `expert` axis). The stats are over the global batch.
  """
  token_axes = tuple(mesh.axis_names)
  x_size = expert_axis_size(mesh)
  num_experts = w_in_XxDx2F.shape[0]
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
      out_specs=(tok, P()))(x_NxD, routing, w_in_XxDx2F, w_out_XxFxD)
