"""Byte accounting of the decode benchmark (experiments/bench_decode.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench_decode import decode_bytes, paired_ratio
from model.config import ModelConfig
from model.transformer import Decoder

TINY = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
            max_seq_len=64, tie_embeddings=False)


def setup(**kw):
  cfg = ModelConfig(**{**TINY, **kw})
  params = jax.jit(Decoder(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return cfg, params


def nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def kv_bytes(cfg, rows, prompt_len, new):
  """K and V read by the decode steps: step i = 1 .. new-1 feeds token i-1 at position
  prompt_len + i - 1 and reads that many earlier positions plus its own, per row."""
  per_pos = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.dim_per_head * 4
  return per_pos * rows * sum(prompt_len + i for i in range(1, new))


def test_dense_model_reads_every_weight_but_the_embedding_table_each_step():
  cfg, params = setup()
  prompt, tokens = np.ones((2, 5), np.int32), np.ones((2, 4), np.int32)
  dense = nbytes(params) - params["embed"].nbytes
  assert decode_bytes(cfg, params, prompt, tokens) == 4 * dense + kv_bytes(cfg, 2, 5, 4)


@pytest.mark.parametrize("top_k,rows,prompt_len,per_layer_step", [
    (4, 2, 5, 4),   # every expert chosen at every step
    (1, 2, 1, 1),   # two identical rows, one token per step (and prompt): one expert
])
def test_moe_steps_read_the_union_of_the_rows_experts(top_k, rows, prompt_len, per_layer_step):
  cfg, params = setup(num_experts=4, moe_top_k=top_k, moe_every=2, moe_dispatch="dropless")
  new = 6
  rng = np.random.default_rng(0)
  prompt = np.repeat(rng.integers(1, 40, (1, prompt_len)), rows, 0).astype(np.int32)
  tokens = np.repeat(rng.integers(1, 40, (1, new)), rows, 0).astype(np.int32)
  moe = params["block_1"]["moe"]
  expert = (moe["w_in"].nbytes + moe["w_out"].nbytes) // 4
  dense = nbytes(params) - params["embed"].nbytes - 4 * expert
  want = new * (dense + cfg.num_moe_layers * per_layer_step * expert) + kv_bytes(
      cfg, rows, prompt_len, new)
  assert decode_bytes(cfg, params, prompt, tokens) == want


def test_ratio_is_the_median_of_each_rounds_ratio_not_the_ratio_of_medians():
  # Round ratios 2, 4, 3: median 3 (the ratio of the medians would be 4 / 1 = 4).
  assert paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == (3.0, 2.0, 4.0)
