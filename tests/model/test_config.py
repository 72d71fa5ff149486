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
    (dict(moe_gate="sigmoid"), "moe_gate"),
    (dict(router_noise="gumbel"), "router_noise"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_experts=1, moe_top_k=1), "num_experts"),
    (dict(aux_load_coef=0.1), "aux_load_coef"),
    (dict(router_noise="jitter"), "router_noise"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=2, num_experts=4, moe_every=3), "moe_every"),
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
