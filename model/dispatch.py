"""Single-device MoE dispatch: the pure functions behind `model/moe.py`.

    y(x) = sum_{i in top-k(x)} gate_i(x) * SwiGLU_i(x)       (Shazeer 2017 eq. 1; Mixtral eq. 2)

Three interchangeable implementations of that sum:

* `capacity_moe`: Switch/GShard fixed-capacity dispatch (index scatter/gather,
  or the papers' one-hot einsum as a reference). Each expert holds at
  most Z = ceil(A * N * capacity_factor / X) tokens (Switch eq. 3 with k
  assignments per token). Slots are filled in priority order: every token's
  first choice before any second choice, then in token order. Assignments
  past capacity are dropped: they contribute 0 here and the token passes
  through the residual connection of the block unchanged (Switch sec. 2.2).
* `dropless_moe`: sort the N*k assignments by expert, run the experts as one
  grouped matmul (`kernels.grouped_matmul`), unsort and combine. Nothing is dropped
  (MegaBlocks, Gale et al. 2022). Decode-sized N takes `expert_loop_moe`
  (one expert at a time on its own tokens, unused experts skipped) or, with
  fewer assignments than experts, a gather of the chosen experts' weights;
  on CPU, the C++ expert kernel (kernels/moe_cpu.py).
* `dense_moe`: every expert on every token, weighted by softmax over all E
  (moe_mode='dense').

The building blocks (`capacity_slots`, `scatter_to_experts`,
`gather_from_experts`, `expert_ffn`, `sort_by_expert`, `grouped_ffn`,
`combine`) are shared with the expert-parallel layer
(`model/expert_parallel.py`), which inserts all-to-all exchanges between them.

Expert weights: w_in (X, D, 2F) [gate | up fused], w_out (X, F, D).
Shape names (README legend): N tokens, D width, X experts, A experts per
token (top-k), Z capacity, F expert hidden width, Y = N*A assignments.
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels import moe_cpu
from kernels.grouped_matmul import grouped_mlp
from model.ffn import swiglu


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
  """Z = ceil(A * tokens / experts * capacity_factor), at least 1."""
  return max(1, math.ceil(top_k * num_tokens * factor / num_experts))


def choice_counts(expert_NxA, num_experts: int):
  """count_AxX[j, e] = number of tokens whose j-th choice is expert e (int32)."""
  return jax.nn.one_hot(expert_NxA, num_experts, dtype=jnp.int32).sum(0)


def capacity_slots(expert_NxA, num_experts: int, capacity: int, offset_AxX=None):
  """Slot of every assignment inside its expert's buffer, priority order.

      slot[n, j] = offset[j, e] + #{n' < n : expert[n', j] = e},   e = expert[n, j]

  With the default offset[j, e] = sum_{j' < j} count[j', e] the priority is
  all first choices (k=0) in token order, then all second choices, ...
  The expert-parallel layer passes the offsets of its token shard inside the
  global order, which makes `slot` the global slot.

  Returns (slot_NxA int32, kept_NxA bool): kept iff slot < capacity.
  """
  onehot_NxAxX = jax.nn.one_hot(expert_NxA, num_experts, dtype=jnp.int32)
  if offset_AxX is None:
    count_AxX = onehot_NxAxX.sum(0)
    offset_AxX = jnp.cumsum(count_AxX, axis=0) - count_AxX
  rank_NxAxX = jnp.cumsum(onehot_NxAxX, axis=0) - 1 + offset_AxX[None]
  slot_NxA = jnp.sum(rank_NxAxX * onehot_NxAxX, axis=-1)
  return slot_NxA, slot_NxA < capacity


def expert_ffn(x_XxZxD, w_in_XxDx2F, w_out_XxFxD):
  """Runs expert e on its rows: [X, Z, D] -> [X, Z, D]."""
  h = jnp.einsum("ecd,edf->ecf", x_XxZxD, w_in_XxDx2F)
  return jnp.einsum("ecf,efd->ecd", swiglu(h), w_out_XxFxD)


def _flat_slot(expert_NxA, slot_NxA, kept_NxA, num_experts: int, capacity: int):
  """Row e*Z + slot of each kept assignment in the flattened [X*Z] buffer;
  dropped ones point one past the end (X*Z). Flattened to [N*A]."""
  return jnp.where(kept_NxA, expert_NxA * capacity + slot_NxA,
                   num_experts * capacity).reshape(-1)


def scatter_to_experts(x_NxD, expert_NxA, slot_NxA, kept_NxA, num_experts: int,
                       capacity: int):
  """buf[e, c] = x[n] for every kept assignment (n, j) -> (e, c); zeros elsewhere.

  Returns x_XxZxD. O(N A D) data movement (no one-hot tensors).
  """
  n, k = expert_NxA.shape
  flat_Y = _flat_slot(expert_NxA, slot_NxA, kept_NxA, num_experts, capacity)
  x_YxD = rearrange(jnp.broadcast_to(x_NxD[:, None], (n, k, x_NxD.shape[-1])),
                    "n k d -> (n k) d")
  x_XZxD = jnp.zeros((num_experts * capacity, x_NxD.shape[-1]), x_NxD.dtype).at[flat_Y].set(
      x_YxD, mode="drop", unique_indices=True)
  return rearrange(x_XZxD, "(e c) d -> e c d", e=num_experts)


def gather_from_experts(y_XxZxD, expert_NxA, slot_NxA, kept_NxA):
  """y[n, j] = buf[expert[n, j], slot[n, j]] if kept else 0. Returns y_NxAxD."""
  num_experts, capacity, _ = y_XxZxD.shape
  flat_Y = _flat_slot(expert_NxA, slot_NxA, kept_NxA, num_experts, capacity)
  y_YxD = rearrange(y_XxZxD, "e c d -> (e c) d").at[flat_Y].get(mode="fill", fill_value=0)
  return rearrange(y_YxD, "(n k) d -> n k d", k=expert_NxA.shape[1])


def combine(y_NxAxD, gate_NxA, kept_NxA=None):
  """y[n] = sum_j gate[n, j] * kept[n, j] * y[n, j]. Returns y_NxD."""
  gate_NxA = gate_NxA.astype(y_NxAxD.dtype)
  if kept_NxA is not None:
    gate_NxA = gate_NxA * kept_NxA
  return jnp.einsum("nk,nkd->nd", gate_NxA, y_NxAxD)


def capacity_moe(x_NxD, expert_NxA, gate_NxA, w_in, w_out, capacity: int,
                 dispatch: str = "gather"):
  """Fixed-capacity dispatch. Returns (y_NxD, kept_NxA).

  dispatch='gather': scatter tokens into the [X, Z, D] expert buffers by their
    (expert, slot) index and gather the outputs back; O(N k D) data movement.
  dispatch='einsum': the Switch/GShard formulation with one-hot dispatch and
    combine tensors [N, X, Z]; O(N X Z D) = O(A N^2 cf D) FLOPs. Same result;
    kept as the reference the benchmarks compare against.
  """
  num_experts = w_in.shape[0]
  slot_NxA, kept_NxA = capacity_slots(expert_NxA, num_experts, capacity)
  if dispatch == "einsum":
    gate_NxA = gate_NxA.astype(x_NxD.dtype)
    # dispatch[n, e, c] = 1 iff token n sits in slot c of expert e.
    dispatch_NxAxXxZ = (jax.nn.one_hot(expert_NxA, num_experts, dtype=x_NxD.dtype)[..., None]
                        * jax.nn.one_hot(jnp.where(kept_NxA, slot_NxA, capacity), capacity,
                                         dtype=x_NxD.dtype)[:, :, None, :])
    dispatch_NxXxZ = dispatch_NxAxXxZ.sum(1)
    combine_NxXxZ = jnp.einsum("nk,nkec->nec", gate_NxA, dispatch_NxAxXxZ)
    x_XxZxD = jnp.einsum("nec,nd->ecd", dispatch_NxXxZ, x_NxD)
    y_XxZxD = expert_ffn(x_XxZxD, w_in, w_out)
    return jnp.einsum("nec,ecd->nd", combine_NxXxZ, y_XxZxD), kept_NxA
  if dispatch != "gather":
    raise ValueError(f"capacity_moe: unknown dispatch {dispatch!r}")
  x_XxZxD = scatter_to_experts(x_NxD, expert_NxA, slot_NxA, kept_NxA, num_experts, capacity)
  y_XxZxD = expert_ffn(x_XxZxD, w_in, w_out)
  y_NxAxD = gather_from_experts(y_XxZxD, expert_NxA, slot_NxA, kept_NxA)
  return combine(y_NxAxD, gate_NxA, kept_NxA), kept_NxA


def sort_by_expert(expert_NxA, num_experts: int):
  """Stable sort of the Y = N*A assignments by expert.

  Returns (order_Y, group_sizes_X): assignment order[i] (flat index n*K + j)
  is the i-th row of the sorted layout; expert e owns group_sizes[e]
  consecutive rows.
  """
  flat_Y = expert_NxA.reshape(-1)
  order_Y = jnp.argsort(flat_Y, stable=True)
  return order_Y, jnp.bincount(flat_Y, length=num_experts).astype(jnp.int32)


def grouped_ffn(x_YxD, w_in, w_out, group_sizes_X, expected_rows: int | None = None):
  """Expert e on its group of consecutive rows (grouped matmul: ragged_dot, or
  its CPU form, kernels/grouped_matmul.py; `expected_rows` sizes the latter's
  dense buckets when most rows are padding).

  Rows past sum(group_sizes) belong to no group and come out as 0.
  """
  return grouped_mlp(x_YxD, w_in, w_out, group_sizes_X, swiglu, expected_rows)


# impl='cpu': at most this many tokens (a decode step), dropless_moe loops
# over the experts (`expert_loop_moe`) instead of sorting and running the
# grouped matmul, whose sort, scatter and weight-tile gathers are what costs
# at such sizes on XLA:CPU (docs/performance.md).
SMALL_N = 64


def expert_loop_moe(x_NxD, expert_NxA, gate_NxA, w_in, w_out):
  """Small-N dropless MoE: one expert at a time, on its own tokens only.

  A `lax.fori_loop` over the X experts. Expert e has c_e of the N tokens; its
  rows are gathered into the smallest bucket m >= c_e of (1, 2, 4, ..., N)
  (`lax.switch`: shapes stay static, padding rows are zero and dropped),
  SwiGLU_e runs on those m rows and gate * output is added back to the
  tokens. An expert with no token is skipped, so every used expert's weights
  are read once and the matmuls have ~N*K/E rows instead of N: decode is
  bound by reading expert weights, and XLA:CPU's matmuls stream weights
  fastest with few rows (the dense all-experts form reads every expert with
  N rows and is E/K times the FLOPs).
  """
  n, d = x_NxD.shape
  num_experts = w_in.shape[0]
  chosen_NxX = jnp.zeros((n, num_experts), bool).at[jnp.arange(n)[:, None], expert_NxA].set(True)
  gate_NxX = jnp.zeros((n, num_experts), gate_NxA.dtype).at[
      jnp.arange(n)[:, None], expert_NxA].add(gate_NxA)
  count_X = chosen_NxX.sum(axis=0)
  tokens_XxN = jnp.argsort(~chosen_NxX.T, axis=1, stable=True)  # expert e's tokens first
  x_pad = jnp.concatenate([x_NxD, jnp.zeros((1, d), x_NxD.dtype)])        # row n = padding
  gate_pad = jnp.concatenate([gate_NxX, jnp.zeros((1, num_experts), gate_NxX.dtype)])
  buckets = tuple(sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)}))

  def run_expert(e, m):
    def apply(y_NxD):
      rows_m = jnp.where(jnp.arange(m) < count_X[e], tokens_XxN[e, :m], n)
      h = swiglu(x_pad[rows_m] @ w_in[e])
      out_mxD = (h @ w_out[e]) * gate_pad[rows_m, e][:, None].astype(h.dtype)
      return y_NxD.at[rows_m].add(out_mxD.astype(y_NxD.dtype), mode="drop")
    return apply

  def body(e, y_NxD):
    # 0: skip; b + 1: the b-th bucket, the first with room for count_X[e] rows.
    branch = jnp.where(count_X[e] == 0, 0, 1 + jnp.sum(jnp.asarray(buckets) < count_X[e]))
    return jax.lax.switch(branch, [lambda y: y] + [run_expert(e, m) for m in buckets], y_NxD)

  return jax.lax.fori_loop(0, num_experts, body, jnp.zeros_like(x_NxD))


def dropless_moe(x_NxD, expert_NxA, gate_NxA, w_in, w_out, impl: str = "xla",
                 threads: int = 0):
  """Sort by expert + grouped matmul (ragged_dot); no token is dropped.

  With fewer assignments than experts (N*A < X: batch-1 decode), only the
  chosen experts' weights are gathered and run, on any backend. Decode-sized
  N (<= SMALL_N) on CPU, by `impl` (model/impl.py): 'cpu_kernel' runs the
  C++ expert kernel (kernels/moe_cpu.py, float32, `threads` threads), which
  reads every chosen expert once, in place, for all its rows; 'cpu' loops
  over the chosen experts (`expert_loop_moe`). All give the same sum.
  """
  n, k = expert_NxA.shape
  small = n <= SMALL_N and impl in ("cpu", "cpu_kernel")
  if small and impl == "cpu_kernel" and x_NxD.dtype == w_in.dtype == jnp.float32:
    return moe_cpu.moe_ffn(x_NxD, expert_NxA, gate_NxA, w_in, w_out, threads=threads)
  if n * k < w_in.shape[0]:  # fewer assignments than experts: read only theirs
    flat_Y = expert_NxA.reshape(-1)
    x_Yx1xD = jnp.repeat(x_NxD, k, axis=0)[:, None]
    y_Yx1xD = expert_ffn(x_Yx1xD, w_in[flat_Y], w_out[flat_Y])
    return combine(rearrange(y_Yx1xD, "(n k) 1 d -> n k d", k=k), gate_NxA)
  if small:
    return expert_loop_moe(x_NxD, expert_NxA, gate_NxA, w_in, w_out)
  order_Y, group_sizes_X = sort_by_expert(expert_NxA, w_in.shape[0])
  y_sorted_YxD = grouped_ffn(x_NxD[order_Y // k], w_in, w_out, group_sizes_X)
  y_YxD = jnp.zeros_like(y_sorted_YxD).at[order_Y].set(y_sorted_YxD, unique_indices=True)
  return combine(rearrange(y_YxD, "(n k) d -> n k d", k=k), gate_NxA)


def dense_moe(x_NxD, probs_NxX, w_in, w_out):
  """Every expert on every token, weighted by the full softmax."""
  # Experts as the batch axis of the matmuls ('ecd,edf'), the layout the
  # weights are stored in: "nd,edf->nef" makes XLA:CPU transpose every expert
  # weight on every call, which dominates small decode steps.
  x_XxNxD = jnp.broadcast_to(x_NxD, (w_in.shape[0],) + x_NxD.shape)
  y_XxNxD = expert_ffn(x_XxNxD, w_in, w_out)
  return jnp.einsum("ne,end->nd", probs_NxX.astype(x_NxD.dtype), y_XxNxD)
