"""KV elements/bytes per token: DeepSeek-V2 Table 1, and what the cache allocates."""

import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig
from model.kv_accounting import attention_kind, describe, kv_per_token
from model.kv_cache import ContiguousSpec

L, H, E = 3, 8, 16            # layers l, heads n_h, head width d_h
COMMON = dict(num_layers=L, num_heads=H, d_model=H * E, ffn_dim=64)
CASES = {  # name: (config, Table 1 elements per token)
    "MHA": (ModelConfig(**COMMON, num_kv_heads=H), 2 * H * E * L),
    "GQA": (ModelConfig(**COMMON, num_kv_heads=2), 2 * 2 * E * L),
    "MQA": (ModelConfig(**COMMON, num_kv_heads=1), 2 * E * L),
    "MLA": (ModelConfig(**COMMON, attention="mla", kv_lora_rank=4 * E, rope_head_dim=E // 2),
            (4 * E + E // 2) * L),
}


def allocated_bytes_per_token(cfg, dtype, mla="absorbed", rows=3, max_len=40):
  cache = ContiguousSpec(mla=mla).init(cfg, rows, max_len, dtype)
  return sum(x.nbytes for x in jax.tree.leaves(cache)) / (rows * max_len)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_table_1_formulas_and_the_bytes_the_cache_allocates(name, dtype):
  cfg, elements = CASES[name]
  cfg = cfg.replace(dtype=dtype)
  assert attention_kind(cfg) == name
  got_elements, got_bytes = kv_per_token(cfg)
  assert got_elements == elements
  assert got_bytes == elements * jnp.dtype(dtype).itemsize
  assert got_bytes == allocated_bytes_per_token(cfg, dtype)
  assert f"{elements} elements" in describe(cfg)


def test_mla_latent_is_about_gqa_with_two_and_a_quarter_groups():
  """Table 1: MLA with d_c = 4 d_h, d_R = d_h / 2 caches (9/2) d_h l."""
  assert kv_per_token(CASES["MLA"][0])[0] == 9 * E * L // 2


def test_expanded_mla_holds_per_head_keys_and_values():
  cfg = CASES["MLA"][0].replace(v_head_dim=12)
  elements, nbytes = kv_per_token(cfg, mla_impl="expanded")
  assert elements == H * ((E + E // 2) + 12) * L
  assert nbytes == allocated_bytes_per_token(cfg, "float32", mla="expanded")
  with pytest.raises(ValueError, match="mla_impl"):
    kv_per_token(cfg, mla_impl="latent")
