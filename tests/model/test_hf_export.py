"""moelab -> save_hf -> transformers: the same logits; inexpressible configs refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model.config import ModelConfig
from model.hf_interop import load_hf, save_hf
from model.transformer import Decoder

BASE = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
            max_seq_len=64)
MLA = dict(BASE, num_kv_heads=4, attention="mla", kv_lora_rank=16, rope_head_dim=8,
           q_lora_rank=12, nope_head_dim=8, v_head_dim=12)
CASES = {
    "dense": (ModelConfig(**BASE, tie_embeddings=False, head_dim=16), "LlamaForCausalLM"),
    "mixtral": (ModelConfig(**BASE, num_experts=4, moe_top_k=2, moe_ffn_dim=24,
                            router_noise="jitter", router_jitter_eps=0.1), "MixtralForCausalLM"),
    "deepseek": (ModelConfig(**MLA, num_experts=8, moe_top_k=2, moe_ffn_dim=16,
                             moe_gate="sigmoid", moe_num_shared_experts=1, n_group=4,
                             topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                             moe_dispatch="dropless", router_bias_update_rate=1e-3),
                 "DeepseekV3ForCausalLM"),
}


def random_params(cfg):
  """Random params of the model's shapes (numpy: no init to compile): matrices
  at 1.5 / sqrt(fan-in), norm scales around 1, routers and the (HF-zero)
  selection biases random, so that every weight matters."""
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(1)

  def fill(path, x):
    path = jax.tree_util.keystr(path)
    if x.ndim == 1:
      return rng.uniform(-0.3, 0.3, x.shape).astype(np.float32) + ("scale" in path)
    expert = "moe" in path and "shared" not in path and "router" not in path
    fan_in = x.shape[1] if expert else x.shape[0] * (x.shape[1] if "w_o'" in path else 1)
    return (rng.normal(0, 1.5 / np.sqrt(fan_in), x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_gives_the_same_logits(name, tmp_path):
  cfg, arch = CASES[name]
  params = random_params(cfg)
  notes = save_hf(cfg, params, str(tmp_path), bos_token_id=1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(hf).__name__ == arch and hf.config.bos_token_id == 1
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  with torch.no_grad():
    got = hf(torch.tensor(tokens)).logits.numpy()
  # HF runs every token through its experts: moelab's (dropless) decode function
  ref, _ = jax.jit(Decoder(cfg.replace(moe_dispatch="dropless")).apply)(
      {"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4, rtol=0)
  if name == "mixtral":
    assert any("capacity" in n for n in notes) and any("router_noise" in n for n in notes)
  if name == "deepseek":
    assert any("router_bias_update_rate" in n for n in notes)
  # and back: load_hf reads what save_hf wrote
  cfg2, params2 = load_hf(str(tmp_path))
  assert cfg2.attention == cfg.attention and cfg2.num_experts == cfg.num_experts
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw, field", [
    (dict(BASE, num_experts=4, moe_gate="softmax_topk"), "moe_gate"),
    (dict(BASE, num_experts=4, moe_mode="dense"), "moe_mode"),
    (dict(BASE, num_experts=4, moe_every=2), "moe_every"),
    (dict(BASE, num_experts=4, first_k_dense_replace=1), "first_k_dense_replace"),
    (dict(BASE, num_experts=4, routed_scaling_factor=2.0), "routed_scaling_factor"),
    (dict(BASE, num_experts=4, moe_gate="sigmoid"), "moe_gate"),
    (dict(MLA, num_experts=4), "moe_gate"),
    (dict(MLA, num_experts=4, moe_gate="sigmoid", moe_ffn_dim=16, moe_num_shared_experts=1,
          moe_shared_ffn_dim=24), "moe_shared_ffn_dim"),
])
def test_configs_hf_cannot_express_are_refused_naming_the_field(kw, field, tmp_path):
  cfg = ModelConfig(**kw)
  params = random_params(cfg)
  with pytest.raises(ValueError, match=f"model.{field}="):
    save_hf(cfg, params, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
