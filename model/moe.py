"""Mixture-of-Experts FFN: router -> dispatch -> SwiGLU experts -> combine.

    y(x) = sum_{i in top-k(x)} gate_i(x) * SwiGLU_i(x)       (Shazeer 2017 eq. 1; Mixtral eq. 2)

With moe_num_shared_experts = N_s > 0 (DeepSeek-V3, arXiv 2412.19437 eq. 12)
always-on experts are added to the routed output,

    h'(u) = u + sum_{i <= N_s} FFN^(s)_i(u) + sum_{i in top-k} g_i FFN^(r)_i(u)

run as one SwiGLU `moe/shared` of width moe_shared_ffn_dim (N_s * the expert
width, as HF DeepSeek-V3 stores them); the residual u is added by the block.
The gates g_i are the router's (sigmoid with a selection bias, model/router.py).

The dispatch (`moe_mode` / `moe_dispatch`) is one of the pure functions of
`model/dispatch.py` (re-exported here): `capacity_moe` (Switch/GShard fixed
capacity, overflow dropped), `dropless_moe` (sort + grouped matmul) or
`dense_moe` (every expert, softmax weighted).

Expert parallelism: when the layer runs under a mesh
(`jax.set_mesh(mesh)`, see train/mesh.py) whose `expert` axis has more than
one device, sparse dispatch goes through `model/expert_parallel.py`
(shard_map + all_to_all) with the same semantics, drops included, and the
routing statistics are those of the global batch. Otherwise the
single-device functions run (under jit they are partitioned by XLA).

Decoding (`decoding=True`, `Decoder.decode`) always dispatches dropless,
whatever `moe_dispatch` the model was trained with: every token of a step
gets all of its top-k experts, so a row's output does not depend on which
rows share its step. Capacity stays for training and the evaluation loss.
`impl.moe` (model/impl.py) picks the decode-sized implementation.

Expert weights: w_in (X, D, 2F) [gate | up fused], w_out (X, F, D).
Shape names (README legend): B batch, L length, N = B*L tokens, D width,
X experts, A experts per token (top-k), Z capacity, F expert hidden width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from model import expert_parallel
from model.config import ModelConfig
from model.dispatch import (capacity_moe, capacity_slots, dense_moe, dropless_moe,  # noqa: F401
                            expert_capacity, expert_ffn)
from model.ffn import SwiGLU, fan_in_init
from model.impl import ModelImpl
from model.router import Router, Routing
from model.routing_losses import router_stats, sequence_balance

class MoE(nn.Module):
  """x_BxLxD -> (y_BxLxD, RouterStats). Params: router/w_gate, w_in, w_out."""

  cfg: ModelConfig
  impl: ModelImpl = ModelImpl()

  def setup(self):
    cfg = self.cfg
    e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim
    self.router = Router(cfg)
    self.w_in = self.param("w_in", fan_in_init(batch_axis=(0,)), (e, d, 2 * f), jnp.float32)
    self.w_out = self.param("w_out", fan_in_init(batch_axis=(0,)), (e, f, d), jnp.float32)
    if cfg.moe_num_shared_experts:
      self.shared = SwiGLU(cfg, cfg.shared_ffn_dim, self.impl)

  def experts(self, x_NxD, routing: Routing, train: bool, decoding: bool = False):
    """Dispatch + experts + combine. Returns (y_NxD, RouterStats)."""
    cfg = self.cfg
    dispatch = "dropless" if decoding else cfg.moe_dispatch
    dt = jnp.dtype(cfg.dtype)
    w_in, w_out = self.w_in.astype(dt), self.w_out.astype(dt)
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    mesh = jax.sharding.get_abstract_mesh()
    # Parameter shapes do not depend on the dispatch: init stays single-device.
    if (cfg.moe_mode == "sparse" and expert_parallel.expert_axis_size(mesh) > 1
        and not self.is_initializing()):
      return expert_parallel.expert_parallel_moe(
          x_NxD, routing, w_in, w_out, mesh, dispatch=dispatch,
          capacity_factor=factor, exchange=cfg.moe_ep_exchange)
    if cfg.moe_mode == "dense":
      y, dropped = dense_moe(x_NxD, routing.probs_NxX, w_in, w_out), 0.0
    elif dispatch == "dropless":
      y = dropless_moe(x_NxD, routing.expert_NxA, routing.gate_NxA, w_in, w_out,
                       impl=self.impl.moe, threads=self.impl.moe_threads)
      dropped = 0.0
    else:
      capacity = expert_capacity(x_NxD.shape[0], cfg.num_experts, cfg.moe_top_k, factor)
      y, kept_NxA = capacity_moe(x_NxD, routing.expert_NxA, routing.gate_NxA,
                                 w_in, w_out, capacity)
      dropped = 1.0 - kept_NxA.mean()
    return y, router_stats(routing, dropped)

  def __call__(self, x_BxLxD, train: bool = False, decoding: bool = False):
    b = x_BxLxD.shape[0]
    x_NxD = rearrange(x_BxLxD, "b l d -> (b l) d").astype(jnp.dtype(self.cfg.dtype))
    routing = self.router(x_NxD, train)
    y_NxD, stats = self.experts(x_NxD, routing, train, decoding)
    stats = stats.replace(seq_balance=sequence_balance(routing, b))
    y_BxLxD = rearrange(y_NxD, "(b l) d -> b l d", b=b)
    if self.cfg.moe_num_shared_experts:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    return y_BxLxD, stats
