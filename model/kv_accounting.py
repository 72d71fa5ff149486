"""Decode-cache size per token: elements and bytes, all layers together.

DeepSeek-V2 (arXiv 2405.04434) Table 1, with l layers, n_h heads of width
d_h, n_g kv groups, latent width d_c and decoupled RoPE width d_R:

    MHA   2 n_h d_h l          (num_kv_heads == num_heads)
    GQA   2 n_g d_h l          (1 < num_kv_heads < num_heads)
    MQA   2 d_h l              (num_kv_heads == 1)
    MLA   (d_c + d_R) l        (attention='mla', absorbed decode: model/latent_cache.py)

MLA decoded with impl.mla='expanded' caches per-head keys and values
instead: n_h (nope + d_R + v) l. Bytes are elements times the cache dtype's
size (the model's activation dtype, as `CacheSpec.init` allocates).
"""

from __future__ import annotations

import jax.numpy as jnp

from model.config import ModelConfig
from model.impl import MLA_IMPLS


def attention_kind(cfg: ModelConfig) -> str:
  """'MHA' | 'GQA' | 'MQA' | 'MLA' (the rows of DeepSeek-V2 Table 1)."""
  if cfg.attention == "mla":
    return "MLA"
  if cfg.num_kv_heads == cfg.num_heads:
    return "MHA"
  return "MQA" if cfg.num_kv_heads == 1 else "GQA"


def kv_per_token(cfg: ModelConfig, dtype=None, mla_impl: str = "absorbed") -> tuple[int, int]:
  """(elements, bytes) the decode cache holds per token over all layers."""
  if mla_impl not in MLA_IMPLS:
    raise ValueError(f"kv_per_token: mla_impl must be one of {MLA_IMPLS} (got {mla_impl!r})")
  if cfg.attention == "mla" and mla_impl == "absorbed":
    per_layer = cfg.kv_lora_rank + cfg.rope_head_dim
  elif cfg.attention == "mla":
    per_layer = cfg.num_heads * (cfg.mla_nope_dim + cfg.rope_head_dim + cfg.mla_v_dim)
  else:
    per_layer = 2 * cfg.num_kv_heads * cfg.dim_per_head
  elements = per_layer * cfg.num_layers
  return elements, elements * jnp.dtype(dtype or cfg.dtype).itemsize


def describe(cfg: ModelConfig, dtype=None, mla_impl: str = "absorbed") -> str:
  """One line: kind, elements and bytes per token (experiments/generate.py --verbose)."""
  elements, nbytes = kv_per_token(cfg, dtype, mla_impl)
  kind = attention_kind(cfg) + (f" ({mla_impl})" if cfg.attention == "mla" else "")
  return (f"KV cache per token: {elements} elements, {nbytes} bytes "
          f"({kind}, {cfg.num_layers} layers, {jnp.dtype(dtype or cfg.dtype).name})")
