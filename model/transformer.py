"""Decoder-only transformer (pre-norm, RoPE, SwiGLU or MoE FFN).

    h_0 = Emb(tokens)
    a_l = h_{l-1} + Attn(RMSNorm(h_{l-1}))
    h_l = a_l + FFN_l(RMSNorm(a_l))        FFN_l = SwiGLU, or MoE every moe_every-th block
                                           from block first_k_dense_replace on
    Attn = grouped attention (model/attention.py) or MLA (attention='mla', model/mla.py)
    logits = RMSNorm(h_L) W_unembed         W_unembed = Emb^T when tie_embeddings

`Decoder.__call__(tokens_BxL, positions_BxL=None, train=False)` returns
`(logits_BxLxV, aux)` where `aux` holds the routing statistics of every MoE
block stacked on a leading layer axis (`aux['stats']`, a RouterStats with
arrays of shape [num_moe_layers, ...]) and the weighted auxiliary loss
averaged over MoE blocks (`aux['loss']`, 0.0 for a dense model).

`Decoder.decode(tokens_BxL, positions_BxL, cache)` is the inference path
(prefill and decode steps alike): every block attends to the cached
positions before the step and writes its new keys/values into `cache` (any
implementation of the protocol in model/cache.py) at `positions_BxL`.
Returns `(logits_BxLxV, cache)`. MoE blocks route as in evaluation (no
router noise) and dispatch dropless, so no token of a step is dropped and a
row's output never depends on the other rows of its batch.

`impl` (model/impl.py) picks backend-specific implementations of the same
function for decoding; training uses the defaults.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention
from model.config import ModelConfig
from model.ffn import SwiGLU
from model.impl import ModelImpl
from model.linear import PACKED, packed_km, project
from model.mla import MLA
from model.moe import MoE
from model.norm import RMSNorm
from model.routing_losses import aux_losses

# Rematerialisation (impl.remat, Chen et al. 2016 arXiv 1604.06174): a
# checkpointed module keeps only its inputs and recomputes the rest in the
# backward pass.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


class Block(nn.Module):
  """One pre-norm block. Returns (h_BxLxD, RouterStats | None, cache)."""

  cfg: ModelConfig
  moe: bool
  layer: int = 0
  impl: ModelImpl = ModelImpl()

  @nn.compact
  def __call__(self, h_BxLxD, positions_BxL, train: bool = False, cache=None,
               fresh: bool = False):
    cfg = self.cfg
    attention = MLA if cfg.attention == "mla" else Attention
    moe, ffn = MoE, SwiGLU
    if self.impl.remat == "full" and cache is None:  # sub-layers too (model/impl.py)
      # static_argnums count `self` as 0: (layer, fresh) and (train, decoding).
      attention = nn.remat(attention, policy=REMAT_POLICY, static_argnums=(4, 5))
      moe = nn.remat(MoE, policy=REMAT_POLICY, static_argnums=(2, 3))
      ffn = nn.remat(SwiGLU, policy=REMAT_POLICY)
    a, cache = attention(cfg, self.impl, name="attn")(
        RMSNorm(cfg.norm_eps, name="attn_norm")(h_BxLxD), positions_BxL, cache, self.layer,
        fresh)
    h_BxLxD = h_BxLxD + a
    x = RMSNorm(cfg.norm_eps, name="ffn_norm")(h_BxLxD)
    if self.moe:
      f, stats = moe(cfg, self.impl, name="moe")(x, train, cache is not None)
    else:
      f, stats = ffn(cfg, impl=self.impl, name="ffn")(x), None
    return h_BxLxD + f, stats, cache


class Decoder(nn.Module):
  """tokens_BxL -> (logits_BxLxV, aux). See the module docstring."""

  cfg: ModelConfig
  impl: ModelImpl = ModelImpl()

  def setup(self):
    cfg = self.cfg
    self.embed = self.param("embed", nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                            (cfg.vocab_size, cfg.d_model), jnp.float32)
    block = Block
    if self.impl.remat != "none":  # keep each block's inputs only (model/impl.py)
      # static_argnums count `self` as 0: train and fresh are Python bools.
      block = nn.remat(Block, policy=REMAT_POLICY, static_argnums=(3, 5))
    self.blocks = [block(cfg, cfg.is_moe_layer(i), i, self.impl, name=f"block_{i}")
                   for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.unembed = self.param("unembed", nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal"), (cfg.d_model, cfg.vocab_size), jnp.float32)

  def embed_tokens(self, tokens_BxL):
    bits_VxD = self.embed_bits()
    if bits_VxD is None:
      h = take_rows(self.embed, tokens_BxL)
    else:
      h = jax.lax.bitcast_convert_type(jnp.take(bits_VxD, tokens_BxL, axis=0), self.embed.dtype)
    return h.astype(jnp.dtype(self.cfg.dtype))

  def embed_bits(self):
    """A 16-bit table's bits for a decode loop (impl.matmul_packed), from the "packed"
    collection where the caller passed it (decode/generate.py `packed_weights`), else None.

    `take_rows` bitcasts the whole table, which XLA:CPU runs as a copy, hoisted out of the
    loop but redone each call (56 MB, 25-75 ms a SmolLM2 bf16 run, docs/performance.md).
    """
    if not self.impl.matmul_packed or self.embed.dtype not in (jnp.bfloat16, jnp.float16):
      return None
    if self.has_variable(PACKED, "embed_bits"):
      return self.get_variable(PACKED, "embed_bits")
    if not self.is_mutable_collection(PACKED):
      return None
    bits_VxD = jax.lax.bitcast_convert_type(self.embed, jnp.uint16)
    self.put_variable(PACKED, "embed_bits", bits_VxD)
    return bits_VxD

  def logits(self, h_BxLxD):
    """Final norm + unembedding, float32 logits (the product's accumulator, unrounded).

    A tied table is the [V, D] product x @ Emb^T, or in a decode loop (impl.matmul_packed)
    its transpose's packed layout: the kernel's 'km' register tiles read it in one
    sequential pass, with no per-row sums to reduce (SmolLM2, 8 rows: 2.0 against 2.7 ms).
    """
    h, impl, f32 = self.final_norm(h_BxLxD), self.impl, jnp.float32
    if not self.cfg.tie_embeddings:
      return project(h, self.unembed, impl, h.dtype, out_dtype=f32,
                     packed_w=packed_km(self, "unembed", self.unembed, impl, h.dtype))
    if impl.matmul_packed:
      w_DxV = self.embed.T
      return project(h, w_DxV, impl, h.dtype, out_dtype=f32,
                     packed_w=packed_km(self, "embed_T", w_DxV, impl, h.dtype))
    return project(h, self.embed, impl, h.dtype, transpose_w=True, out_dtype=f32)

  def __call__(self, tokens_BxL, positions_BxL: Optional[jax.Array] = None,
               train: bool = False):
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    h = self.embed_tokens(tokens_BxL)
    stats = []
    for block in self.blocks:
      h, s, _ = block(h, positions_BxL, train, None, False)  # all positional (nn.remat)
      if s is not None:
        stats.append(s)
    return self.logits(h), collect_aux(stats, self.cfg)

  def decode(self, tokens_BxL, positions_BxL, cache, fresh: bool = False, logits_at_B=None):
    """Cached forward: (logits_BxLxV, cache with the L new tokens written).

    fresh: the cache holds nothing before these tokens (prefill from position
    0); attention then stays within the L tokens (model/attention.py).
    logits_at_B: if given, only row b's position logits_at_B[b] along L is
    unembedded and logits_Bx1xV is returned (prefill needs the last prompt
    token only; at a 32k vocabulary the full [B, L, V] unembedding costs
    about as much as all the prompt's layers).
    """
    h = self.embed_tokens(tokens_BxL)
    cache = cache.reserve(positions_BxL)
    for block in self.blocks:
      h, _, cache = block(h, positions_BxL, False, cache, fresh)
    if logits_at_B is not None:
      h = jnp.take_along_axis(h, logits_at_B.astype(jnp.int32)[:, None, None], axis=1)
    return self.logits(h), cache


@jax.custom_jvp
def take_rows(table_VxD, ids_BxL):
  """jnp.take(table, ids, axis=0); a 16-bit float table's rows are gathered as their bits.

  XLA:CPU gathers or slices a bfloat16 array through a float32 copy of all of it
  (hoisted out of a decode loop: 113 MB written per SmolLM2 run); integers it
  gathers in place. The derivative is the plain gather's (bit casts have none).
  """
  if table_VxD.dtype not in (jnp.bfloat16, jnp.float16):
    return jnp.take(table_VxD, ids_BxL, axis=0)
  bits = jnp.take(jax.lax.bitcast_convert_type(table_VxD, jnp.uint16), ids_BxL, axis=0)
  return jax.lax.bitcast_convert_type(bits, table_VxD.dtype)


@take_rows.defjvp
def _take_rows_jvp(primals, tangents):
  table_VxD, ids_BxL = primals
  return take_rows(table_VxD, ids_BxL), jnp.take(tangents[0], ids_BxL, axis=0)


def collect_aux(stats: list, cfg: ModelConfig) -> dict:
  """Stacks per-block RouterStats and averages the weighted aux loss over blocks."""
  if not stats:
    return {"loss": jnp.zeros((), jnp.float32)}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
  losses = jax.vmap(lambda s: aux_losses(s, cfg))(stacked)
  return {"loss": losses["total"].mean(), "losses": losses, "stats": stacked}
