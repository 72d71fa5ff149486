"""Mixture-of-Experts FFN: router -> dispatch -> SwiGLU experts -> combine.

    y(x) = sum_{i in top-k(x)} gate_i(x) * SwiGLU_i(x)       (Shazeer 2017 eq. 1; Mixtral eq. 2)

Three interchangeable dispatch implementations compute that sum
(`moe_mode` / `moe_dispatch`):

* `capacity_moe`: Switch/GShard fixed-capacity dispatch (index scatter/gather,
  or the papers' one-hot einsum as a reference). Each expert holds at
  most C = ceil(k * N * capacity_factor / E) tokens (Switch eq. 3 with k
  assignments per token). Slots are filled in priority order: every token's
  first choice before any second choice, then in token order. Assignments
  past capacity are dropped: they contribute 0 here and the token passes
  through the residual connection of the block unchanged (Switch sec. 2.2).
* `dropless_moe`: sort the N*k assignments by expert, run the experts as one
  grouped matmul (`jax.lax.ragged_dot`), unsort and combine. Nothing is dropped
  (MegaBlocks, Gale et al. 2022).
* `dense_moe`: every expert on every token, weighted by softmax over all E
  (moe_mode='dense').

Expert weights: w_in (E, D, 2F) [gate | up fused], w_out (E, F, D).
Shape names: B batch, L length, N = B*L tokens, D width, E experts,
K = top-k, C capacity, F expert hidden width.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from model.config import ModelConfig
from model.ffn import fan_in_init, swiglu
from model.router import Router, Routing
from model.routing_losses import RouterStats, router_stats


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
  """C = ceil(k * tokens / experts * capacity_factor), at least 1."""
  return max(1, math.ceil(top_k * num_tokens * factor / num_experts))


def capacity_slots(expert_NxK, num_experts: int, capacity: int):
  """Slot of every assignment inside its expert's buffer, priority order.

  Returns (slot_NxK int32, kept_NxK bool): kept iff slot < capacity. Priority:
  all first choices (k=0) in token order, then all second choices, ...
  """
  n, k = expert_NxK.shape
  onehot_KNxE = jax.nn.one_hot(expert_NxK.T.reshape(-1), num_experts, dtype=jnp.int32)
  slot_KN = jnp.sum((jnp.cumsum(onehot_KNxE, axis=0) - 1) * onehot_KNxE, axis=-1)
  slot_NxK = slot_KN.reshape(k, n).T
  return slot_NxK, slot_NxK < capacity


def expert_ffn(x_ExCxD, w_in_ExDx2F, w_out_ExFxD):
  """Runs expert e on its rows: [E, C, D] -> [E, C, D]."""
  h = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_in_ExDx2F)
  return jnp.einsum("ecf,efd->ecd", swiglu(h), w_out_ExFxD)


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
  gate_NxK = gate_NxK.astype(x_NxD.dtype)
  if dispatch == "einsum":
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
  n, k = expert_NxK.shape
  d = x_NxD.shape[-1]
  # Dropped assignments point one past the end and are discarded by the scatter.
  flat_NK = jnp.where(kept_NxK, expert_NxK * capacity + slot_NxK,
                      num_experts * capacity).reshape(-1)
  x_NKxD = jnp.broadcast_to(x_NxD[:, None], (n, k, d)).reshape(n * k, d)
  x_ECxD = jnp.zeros((num_experts * capacity, d), x_NxD.dtype).at[flat_NK].set(
      x_NKxD, mode="drop", unique_indices=True)
  y_ExCxD = expert_ffn(x_ECxD.reshape(num_experts, capacity, d), w_in, w_out)
  y_NKxD = y_ExCxD.reshape(num_experts * capacity, d).at[flat_NK].get(
      mode="fill", fill_value=0)
  y_NxKxD = rearrange(y_NKxD, "(n k) d -> n k d", k=k)
  return jnp.einsum("nk,nkd->nd", gate_NxK * kept_NxK, y_NxKxD), kept_NxK


def dropless_moe(x_NxD, expert_NxK, gate_NxK, w_in, w_out):
  """Sort by expert + grouped matmul (ragged_dot); no token is dropped."""
  n, k = expert_NxK.shape
  num_experts = w_in.shape[0]
  flat_expert = expert_NxK.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  group_sizes_E = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  x_sorted = x_NxD[order // k]
  h = jax.lax.ragged_dot(x_sorted, w_in, group_sizes_E)
  y_sorted = jax.lax.ragged_dot(swiglu(h), w_out, group_sizes_E)
  y_NKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  y_NxKxD = rearrange(y_NKxD, "(n k) d -> n k d", k=k)
  return jnp.einsum("nk,nkd->nd", gate_NxK.astype(x_NxD.dtype), y_NxKxD)


def dense_moe(x_NxD, probs_NxE, w_in, w_out):
  """Every expert on every token, weighted by the full softmax."""
  h = jnp.einsum("nd,edf->nef", x_NxD, w_in)
  y_NxExD = jnp.einsum("nef,efd->ned", swiglu(h), w_out)
  return jnp.einsum("ne,ned->nd", probs_NxE.astype(x_NxD.dtype), y_NxExD)


class MoE(nn.Module):
  """x_BxLxD -> (y_BxLxD, RouterStats). Params: router/w_gate, w_in, w_out."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim
    self.router = Router(cfg)
    self.w_in = self.param("w_in", fan_in_init(batch_axis=(0,)), (e, d, 2 * f), jnp.float32)
    self.w_out = self.param("w_out", fan_in_init(batch_axis=(0,)), (e, f, d), jnp.float32)

  def experts(self, x_NxD, routing: Routing, train: bool):
    """Dispatch + experts + combine. Returns (y_NxD, dropped fraction)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w_in, w_out = self.w_in.astype(dt), self.w_out.astype(dt)
    if cfg.moe_mode == "dense":
      return dense_moe(x_NxD, routing.probs_NxE, w_in, w_out), 0.0
    if cfg.moe_dispatch == "dropless":
      return dropless_moe(x_NxD, routing.expert_NxK, routing.gate_NxK, w_in, w_out), 0.0
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    capacity = expert_capacity(x_NxD.shape[0], cfg.num_experts, cfg.moe_top_k, factor)
    y, kept_NxK = capacity_moe(x_NxD, routing.expert_NxK, routing.gate_NxK,
                               w_in, w_out, capacity)
    return y, 1.0 - kept_NxK.mean()

  def __call__(self, x_BxLxD, train: bool = False):
    b = x_BxLxD.shape[0]
    x_NxD = rearrange(x_BxLxD, "b l d -> (b l) d").astype(jnp.dtype(self.cfg.dtype))
    routing = self.router(x_NxD, train)
    y_NxD, dropped = self.experts(x_NxD, routing, train)
    return rearrange(y_NxD, "(b l) d -> b l d", b=b), router_stats(routing, dropped)
