"""Every strategy decodes an MLA + DeepSeek-MoE model: the latent cache grows
between windows, repeats rows for samples/beams and reorders them for beam
parents exactly as the per-head K/V cache does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.generate import generate
from model.config import ModelConfig
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, ffn_dim=48,
                  max_seq_len=256, attention="mla", kv_lora_rank=16, rope_head_dim=8,
                  q_lora_rank=12, num_experts=4, moe_top_k=2, moe_ffn_dim=16,
                  moe_gate="sigmoid", moe_num_shared_experts=1, first_k_dense_replace=1,
                  moe_dispatch="dropless")
NEW = 130  # prompt width 16 + 130 = 146 slots: windows 128, 146 at growth 2
PROMPTS = [[1, 5, 9, 2, 7], [3, 8, 1, 4, 4, 6, 2, 9, 11, 5, 7, 1, 2]]


@pytest.fixture(scope="module")
def params():
  """Random params (numpy, no init to compile) with a random router bias."""
  shapes = jax.eval_shape(lambda: Decoder(CFG).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(0)
  fill = lambda x: (rng.normal(0, 3.0 / np.sqrt(x.shape[0]), x.shape) if x.ndim > 1 else
                    1 + rng.uniform(-0.3, 0.3, x.shape)).astype(np.float32)
  return jax.tree.map(fill, shapes)


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_absorbed_growing_cache_decodes_as_the_expanded_fixed_cache(params, strategy):
  kw = dict(strategy=strategy, max_new_tokens=NEW, seed=3, num_devices=1,
            num_return_sequences=2, num_beams=2,
            **({"temperature": 0.7} if strategy == "sample" else {}))
  latent = generate(CFG, params, PROMPTS, mla_impl="absorbed", cache_growth=2.0, **kw)
  per_head = generate(CFG, params, PROMPTS, mla_impl="expanded", cache_growth=0, **kw)
  assert latent.backend.impl.mla == "absorbed" and per_head.backend.impl.mla == "expanded"
  np.testing.assert_array_equal(latent.lengths, NEW)
  np.testing.assert_array_equal(latent.tokens, per_head.tokens)
  np.testing.assert_allclose(latent.scores, per_head.scores, rtol=1e-4, atol=1e-4)
  assert len({tuple(t) for t in latent.tokens.tolist()}) == 4  # rows differ: not degenerate
