"""Every impossible model config raises a ValueError naming the field."""

import pytest

from model.config import ModelConfig


@pytest.mark.parametrize("kw, field", [
    (dict(num_experts=4, moe_top_k=5), "moe_top_k"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(aux_switch_coef=-1.0), "aux_switch_coef"),
    (dict(aux_z_coef=-0.1), "aux_z_coef"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(moe_mode="soft"), "moe_mode"),
    (dict(moe_dispatch="magic"), "moe_dispatch"),
    (dict(moe_gate="relu"), "moe_gate"),
    (dict(router_noise="gumbel"), "router_noise"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_experts=1, moe_top_k=1), "num_experts"),
    (dict(aux_load_coef=0.1), "aux_load_coef"),
    (dict(router_noise="jitter"), "router_noise"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2, num_experts=4, moe_every=3), "moe_every"),
    # multi-head latent attention
    (dict(attention="mla", kv_lora_rank=32, rope_head_dim=7), "rope_head_dim"),
    (dict(attention="mla", kv_lora_rank=0, rope_head_dim=8), "kv_lora_rank"),
    (dict(attention="mla", kv_lora_rank=-4, rope_head_dim=8), "kv_lora_rank"),
    (dict(attention="mla", kv_lora_rank=32, rope_head_dim=0), "rope_head_dim"),
    (dict(kv_lora_rank=32), "kv_lora_rank"),             # MLA widths without attention='mla'
    (dict(attention="gqa"), "attention"),
    # DeepSeek-V3 MoE
    (dict(num_experts=8, moe_gate="sigmoid", n_group=2, topk_group=3), "topk_group"),
    (dict(num_experts=6, moe_gate="sigmoid", n_group=4, topk_group=2), "n_group"),
    (dict(num_experts=8, n_group=2), "n_group"),            # groups need sigmoid gates
    (dict(num_experts=8, moe_gate="sigmoid", moe_top_k=4, n_group=4, topk_group=1), "topk_group"),
    (dict(num_experts=8, router_bias_update_rate=1e-3), "router_bias_update_rate"),
    (dict(num_experts=8, moe_gate="sigmoid", moe_mode="dense"), "moe_gate"),
    (dict(num_experts=8, moe_gate="sigmoid", router_noise="shazeer"), "router_noise"),
    (dict(moe_num_shared_experts=1), "moe_num_shared_experts"),
    (dict(num_layers=2, num_experts=4, first_k_dense_replace=2), "first_k_dense_replace"),
    (dict(num_experts=4, routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(num_experts=4, aux_seq_coef=-1.0), "aux_seq_coef"),
])
def test_invalid_config_names_field(kw, field):
  with pytest.raises(ValueError, match=f"model.{field}:"):
    ModelConfig(**kw)


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match="num_expert"):
    ModelConfig.from_dict({"num_expert": 4})


def test_valid_config_helpers():
  cfg = ModelConfig(num_layers=4, num_experts=8, moe_every=2, ffn_dim=64)
  assert cfg.num_moe_layers == 2 and cfg.expert_ffn_dim == 64 and cfg.dim_per_head == 32


def test_deepseek_helpers():
  cfg = ModelConfig(num_layers=4, num_experts=8, moe_ffn_dim=16, first_k_dense_replace=1,
                    moe_num_shared_experts=2, moe_gate="sigmoid", n_group=4, topk_group=2,
                    attention="mla", kv_lora_rank=32, rope_head_dim=8, v_head_dim=24)
  assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
  assert cfg.shared_ffn_dim == 32 and cfg.has_router_bias
  assert cfg.mla_nope_dim == 32 and cfg.mla_v_dim == 24
  # MLA has no kv heads: num_kv_heads need not divide num_heads
  ModelConfig(num_heads=4, num_kv_heads=3, attention="mla", kv_lora_rank=32, rope_head_dim=8)
