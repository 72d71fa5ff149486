"""HF Llama / Mistral / Mixtral weights load into moelab with identical logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model.hf_interop import config_from_hf, load_hf, params_from_hf
from model.transformer import Decoder

COMMON = dict(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
              rms_norm_eps=1e-5, max_position_embeddings=128)


def _hf(kind: str, **kw):
  torch.manual_seed(0)
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
         "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[kind]
  extra = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2)}.get(kind, {})
  return cls[1](cls[0](**{**COMMON, **extra, **kw})).eval()


def _logits_match(hf, cfg, params):
  ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = hf(ids).logits.numpy()
  got, _ = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,kw", [
    ("llama", {}),
    ("llama", dict(tie_word_embeddings=True, head_dim=16, rope_theta=500.0)),
    ("mistral", dict(sliding_window=64)),
    ("mixtral", {}),
], ids=["llama", "llama-tied-headdim", "mistral", "mixtral"])
def test_state_dict_logits_match(kind, kw):
  hf = _hf(kind, **kw)
  cfg = config_from_hf(hf.config)
  assert cfg.tie_embeddings == bool(kw.get("tie_word_embeddings", False))
  if kind == "mixtral":
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_gate, cfg.moe_dispatch) == (
        4, 2, "topk_softmax", "dropless")
  if kind == "mistral":
    assert cfg.max_seq_len == 64
  _logits_match(hf, cfg, params_from_hf(hf.state_dict(), cfg))


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_safetensors_directory_logits_match(kind, tmp_path):
  """save_pretrained files (Mixtral: legacy per-expert w1/w2/w3 names) load."""
  hf = _hf(kind)
  hf.save_pretrained(tmp_path)
  cfg, params = load_hf(str(tmp_path))
  assert cfg.rope_theta == json.load(open(tmp_path / "config.json"))["rope_parameters"]["rope_theta"]
  _logits_match(hf, cfg, params)


def test_rejects_unsupported_and_leftover_weights():
  hf = _hf("llama")
  with pytest.raises(ValueError, match="RoPE"):
    config_from_hf({**hf.config.to_dict(), "rope_parameters": {"rope_type": "linear",
                                                               "rope_theta": 1e4, "factor": 2.0}})
  with pytest.raises(ValueError, match="model_type"):
    config_from_hf({**hf.config.to_dict(), "model_type": "gpt2"})
  cfg = config_from_hf(hf.config)
  sd = dict(hf.state_dict())
  with pytest.raises(ValueError, match="unused"):
    params_from_hf({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, cfg)
  sd.pop("model.layers.1.mlp.up_proj.weight")
  with pytest.raises(KeyError, match="up_proj"):
    params_from_hf(sd, cfg)
