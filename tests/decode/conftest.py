"""Tiny random Hugging Face Llama / Mixtral models and their moelab twins; the
'paged_nan_for_test' cache kind."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from model.cache import register
from model.hf_interop import config_from_hf, params_from_hf
from model.paged_cache import PagedSpec

COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25,
              rms_norm_eps=1e-5, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=None)
PROMPTS = [[1, 7, 12, 30, 4, 9], [1, 22, 5], [1, 41, 3, 17, 28, 33, 2, 19, 11]]


def build(kind: str):
  """(hf_model, cfg, params, eos): eos is the 4th greedy token of prompt 0,
  so that hypotheses end at different lengths."""
  torch.manual_seed({"llama": 0, "mixtral": 1}[kind])
  if kind == "llama":
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
  else:
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2))
  hf.eval()
  with torch.no_grad():
    out = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
  eos = int(out[0, -1])
  hf.generation_config.eos_token_id = eos
  hf.generation_config.pad_token_id = 0
  cfg = config_from_hf(hf.config)
  return hf, cfg, params_from_hf(hf.state_dict(), cfg), eos


@pytest.fixture(scope="session", params=["llama", "mixtral"])
def hf_twins(request):
  return build(request.param)


@pytest.fixture
def prompts():
  """Prompts of different lengths (BOS = 1)."""
  return [list(p) for p in PROMPTS]


@register("paged_nan_for_test")
@dataclasses.dataclass(frozen=True)
class NaNPagedSpec(PagedSpec):
  """Pools that start as NaN: a read of a slot no row wrote poisons the output."""

  def init(self, cfg, rows, max_len, dtype=None):
    cache = super().init(cfg, rows, max_len, dtype)
    return cache.replace(layers=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), cache.layers))
