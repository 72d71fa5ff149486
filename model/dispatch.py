"""Single-device MoE dispatch: the pure functions behind `model/moe.py`.

    y(x) = sum_{i in top-k(x)} gate_i(x) * SwiGLU_i(x)       (Shazeer 2017 eq. 1; Mixtral eq. 2)

Three interchangeable implementations of that sum:

* `capacity_moe`: Switch/GShard fixed-capacity dispatch (index scatter/gather,
  or the papers' one-hot einsum as a reference). Each expert holds at
  most C = ceil(k * N * capacity_factor / E) tokens (Switch eq. 3 with k
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

Expert weights: w_in (E, D, 2F) [gate | up fused], w_out (E, F, D).
Shape names: N tokens, D width, E experts, K = top-k, C capacity,
F expert hidden width, M = N*K assignments.
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels import moe_cpu
from kernels.grouped_matmul import grouped_mlp
from model.ffn import swiglu


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
  """C = ceil(k * tokens / experts * capacity_factor), at least 1."""
  return max(1, math.ceil(top_k * num_tokens * factor / num_experts))


def choice_counts(expert_NxK, num_experts: int):
  """count_KxE[j, e] = number of tokens whose j-th choice is expert e (int32)."""
  return jax.nn.one_hot(expert_NxK, num_experts, dtype=jnp.int32).sum(0)


def capacity_slots(expert_NxK, num_experts: int, capacity: int, offset_KxE=None):
  """Slot of every assignment inside its expert's buffer, priority order.

      slot[n, j] = offset[j, e] + #{n' < n : expert[n', j] = e},   e = expert[n, j]

  With the default offset[j, e] = sum_{j' < j} count[j', e] the priority is
  all first choices (k=0) in token order, then all second choices, ...
  The expert-parallel layer passes the offsets of its token shard inside the
  global order, which makes `slot` the global slot.

  Returns (slot_NxK int32, kept_NxK bool): kept iff slot < capacity.
  """
  onehot_NxKxE = jax.nn.one_hot(expert_NxK, num_experts, dtype=jnp.int32)
  if offset_KxE is None:
    count_KxE = onehot_NxKxE.sum(0)
    offset_KxE = jnp.cumsum(count_KxE, axis=0) - count_KxE
  rank_NxKxE = jnp.cumsum(onehot_NxKxE, axis=0) - 1 + offset_KxE[None]
  slot_NxK = jnp.sum(rank_NxKxE * onehot_NxKxE, axis=-1)
  return slot_NxK, slot_NxK < capacity


def expert_ffn(x_ExCxD, w_in_ExDx2F, w_out_ExFxD):
  """Runs expert e on its rows: [E, C, D] -> [E, C, D]."""
  h = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_in_ExDx2F)
  return jnp.einsum("ecf,efd->ecd", swiglu(h), w_out_ExFxD)


def _flat_slot(expert_NxK, slot_NxK, kept_NxK, num_experts: int, capacity: int):
  """Row e*C + slot of each kept assignment in the flattened [E*C] buffer;
  dropped ones point one past the end (E*C). Flattened to [N*K]."""
  return jnp.where(kept_NxK, expert_NxK * capacity + slot_NxK,
                   num_experts * capacity).reshape(-1)


def scatter_to_experts(x_NxD, expert_NxK, slot_NxK, kept_NxK, num_experts: int,
                       capacity: int):
  """buf[e, c] = x[n] for every kept assignment (n, j) -> (e, c); zeros elsewhere.

  Returns x_ExCxD. O(N K D) data movement (no one-hot tensors).
  """
  n, k = expert_NxK.shape
  flat_M = _flat_slot(expert_NxK, slot_NxK, kept_NxK, num_experts, capacity)
  x_MxD = rearrange(jnp.broadcast_to(x_NxD[:, None], (n, k, x_NxD.shape[-1])),
                    "n k d -> (n k) d")
  x_ECxD = jnp.zeros((num_experts * capacity, x_NxD.shape[-1]), x_NxD.dtype).at[flat_M].set(
      x_MxD, mode="drop", unique_indices=True)
  return rearrange(x_ECxD, "(e c) d -> e c d", e=num_experts)


def gather_from_experts(y_ExCxD, expert_NxK, slot_NxK, kept_NxK):
  """y[n, j] = buf[expert[n, j], slot[n, j]] if kept else 0. Returns y_NxKxD."""
  num_experts, capacity, _ = y_ExCxD.shape
  flat_M = _flat_slot(expert_NxK, slot_NxK, kept_NxK, num_experts, capacity)
  y_MxD = rearrange(y_ExCxD, "e c d -> (e c) d").at[flat_M].get(mode="fill", fill_value=0)
  return rearrange(y_MxD, "(n k) d -> n k d", k=expert_NxK.shape[1])


def combine(y_NxKxD, gate_NxK, kept_NxK=None):
  """y[n] = sum_j gate[n, j] * kept[n, j] * y[n, j]. Returns y_NxD."""
  gate_NxK = gate_NxK.astype(y_NxKxD.dtype)
  if kept_NxK is not None:
    gate_NxK = gate_NxK * kept_NxK
  return jnp.einsum("nk,nkd->nd", gate_NxK, y_NxKxD)


def capacity_moe(x_NxD, expert_NxK, gate_NxK, w_in, w_out, capacity: int,
                 dispatch: str = "gather"):
  """Fixed-capacity dispatch. Returns (y_NxD, kept_NxK).

  dispatch='gather': scatter tokens into the [E, C, D] expert buffers by their
    (expert, slot) index and gather the outputs back; O(N k D) data movement.
  dispatch='einsum': the Switch/GShard formulation with one-hot dispatch and
    combine tensors [N, E, C]; O(N E C D) = O(k N^2 cf D) FLOPs. Same result;
    kept as the reference the benchmarks compare against.
  """
  num_experts = w_in.shape[0]
  slot_NxK, kept_NxK = capacity_slots(expert_NxK, num_experts, capacity)
  if dispatch == "einsum":
    gate_NxK = gate_NxK.astype(x_NxD.dtype)
    # dispatch[n, e, c] = 1 iff token n sits in slot c of expert e.
    dispatch_NxKxExC = (jax.nn.one_hot(expert_NxK, num_experts, dtype=x_NxD.dtype)[..., None]
                        * jax.nn.one_hot(jnp.where(kept_NxK, slot_NxK, capacity), capacity,
                                         dtype=x_NxD.dtype)[:, :, None, :])
    dispatch_NxExC = dispatch_NxKxExC.sum(1)
    combine_NxExC = jnp.einsum("nk,nkec->nec", gate_NxK, dispatch_NxKxExC)
    x_ExCxD = jnp.einsum("nec,nd->ecd", dispatch_NxExC, x_NxD)
    y_ExCxD = expert_ffn(x_ExCxD, w_in, w_out)
    return jnp.einsum("nec,ecd->nd", combine_NxExC, y_ExCxD), kept_NxK
  if dispatch != "gather":
    raise ValueError(f"capacity_moe: unknown dispatch {dispatch!r}")
  x_ExCxD = scatter_to_experts(x_NxD, expert_NxK, slot_NxK, kept_NxK, num_experts, capacity)
  y_ExCxD = expert_ffn(x_ExCxD, w_in, w_out)
  y_NxKxD = gather_from_experts(y_ExCxD, expert_NxK, slot_NxK, kept_NxK)
  return combine(y_NxKxD, gate_NxK, kept_NxK), kept_NxK


def sort_by_expert(expert_NxK, num_experts: int):
  """Stable sort of the M = N*K assignments by expert.

  Returns (order_M, group_sizes_E): assignment order[i] (flat index n*K + j)
  is the i-th row of the sorted layout; expert e owns group_sizes[e]
  consecutive rows.
  """
  flat_M = expert_NxK.reshape(-1)
  order_M = jnp.argsort(flat_M, stable=True)
  return order_M, jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)


def grouped_ffn(x_MxD, w_in, w_out, group_sizes_E, expected_rows: int | None = None):
  """Expert e on its group of consecutive rows (grouped matmul: ragged_dot, or
  its CPU form, kernels/grouped_matmul.py; `expected_rows` sizes the latter's
  dense buckets when most rows are padding).

  Rows past sum(group_sizes) belong to no group and come out as 0.
  """
  return grouped_mlp(x_MxD, w_in, w_out, group_sizes_E, swiglu, expected_rows)


# At most this many tokens (e.g. a decode step), dropless_moe loops over the
# experts (`expert_loop_moe`) instead of sorting and running the grouped
# matmul, whose sort, scatter and weight-tile gathers are what costs at such
# sizes on CPU.
SMALL_N = 64


def expert_loop_moe(x_NxD, expert_NxK, gate_NxK, w_in, w_out):
  """Small-N dropless MoE: one expert at a time, on its own tokens only.

  A `lax.fori_loop` over the E experts. Expert e has c_e of the N tokens; its
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
  chosen_NxE = jnp.zeros((n, num_experts), bool).at[jnp.arange(n)[:, None], expert_NxK].set(True)
  gate_NxE = jnp.zeros((n, num_experts), gate_NxK.dtype).at[
      jnp.arange(n)[:, None], expert_NxK].add(gate_NxK)
  count_E = chosen_NxE.sum(axis=0)
  tokens_ExN = jnp.argsort(~chosen_NxE.T, axis=1, stable=True)  # expert e's tokens first
  x_pad = jnp.concatenate([x_NxD, jnp.zeros((1, d), x_NxD.dtype)])        # row n = padding
  gate_pad = jnp.concatenate([gate_NxE, jnp.zeros((1, num_experts), gate_NxE.dtype)])
  buckets = tuple(sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)}))

  def run_expert(e, m):
    def apply(y_NxD):
      rows_m = jnp.where(jnp.arange(m) < count_E[e], tokens_ExN[e, :m], n)
      h = swiglu(x_pad[rows_m] @ w_in[e])
      out_mxD = (h @ w_out[e]) * gate_pad[rows_m, e][:, None].astype(h.dtype)
      return y_NxD.at[rows_m].add(out_mxD.astype(y_NxD.dtype), mode="drop")
    return apply

  def body(e, y_NxD):
    # 0: skip; b + 1: the b-th bucket, the first with room for count_E[e] rows.
    branch = jnp.where(count_E[e] == 0, 0, 1 + jnp.sum(jnp.asarray(buckets) < count_E[e]))
    return jax.lax.switch(branch, [lambda y: y] + [run_expert(e, m) for m in buckets], y_NxD)

  return jax.lax.fori_loop(0, num_experts, body, jnp.zeros_like(x_NxD))


def dropless_moe(x_NxD, expert_NxK, gate_NxK, w_in, w_out, kernel_threads: int = 0):
  """Sort by expert + grouped matmul (ragged_dot); no token is dropped.

  Small N (decode steps), where sort/scatter overhead and weight reads cost
  more than FLOPs: with `kernel_threads` > 0 (CPU, float32), the C++ expert
  kernel (kernels/moe_cpu.py) reads every chosen expert once, in place, for
  all its rows; else with N*K < E the chosen experts' weights are gathered
  from the stacked weights; otherwise, for N <= SMALL_N, `expert_loop_moe`.
  All give the same sum.
  """
  n, k = expert_NxK.shape
  if kernel_threads and n <= SMALL_N and x_NxD.dtype == w_in.dtype == jnp.float32:
    return moe_cpu.moe_ffn(x_NxD, expert_NxK, gate_NxK, w_in, w_out, threads=kernel_threads)
  if n * k < w_in.shape[0]:  # fewer assignments than experts: read only theirs
    flat_M = expert_NxK.reshape(-1)
    x_Mx1xD = jnp.repeat(x_NxD, k, axis=0)[:, None]
    y_Mx1xD = expert_ffn(x_Mx1xD, w_in[flat_M], w_out[flat_M])
    return combine(rearrange(y_Mx1xD, "(n k) 1 d -> n k d", k=k), gate_NxK)
  if n <= SMALL_N:
    return expert_loop_moe(x_NxD, expert_NxK, gate_NxK, w_in, w_out)
  order_M, group_sizes_E = sort_by_expert(expert_NxK, w_in.shape[0])
  y_sorted_MxD = grouped_ffn(x_NxD[order_M // k], w_in, w_out, group_sizes_E)
  y_MxD = jnp.zeros_like(y_sorted_MxD).at[order_M].set(y_sorted_MxD, unique_indices=True)
  return combine(rearrange(y_MxD, "(n k) d -> n k d", k=k), gate_NxK)


def dense_moe(x_NxD, probs_NxE, w_in, w_out):
  """Every expert on every token, weighted by the full softmax."""
  # Experts as the batch axis of the matmuls ('ecd,edf'), the layout the
  # weights are stored in: "nd,edf->nef" makes XLA:CPU transpose every expert
  # weight on every call, which dominates small decode steps.
  x_ExNxD = jnp.broadcast_to(x_NxD, (w_in.shape[0],) + x_NxD.shape)
  y_ExNxD = expert_ffn(x_ExNxD, w_in, w_out)
  return jnp.einsum("ne,end->nd", probs_NxE.astype(x_NxD.dtype), y_ExNxD)
