"""model/rope.py: the table form of RoPE (ModelImpl.rope_table) rotates exactly as the
per-position form, and a decode step built with it evaluates cos once, not per layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.impl import ModelImpl
from model.rope import apply_rope
from model.transformer import Decoder


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_table_rotation_equals_the_direct_one(interleave, dtype):
  x = jax.random.normal(jax.random.key(0), (3, 5, 4, 16)).astype(dtype)
  pos = jax.random.randint(jax.random.key(1), (3, 5), 0, 500)
  want = apply_rope(x, pos, 1e4, interleave)
  got = jax.jit(lambda x, p: apply_rope(x, p, 1e4, interleave, table_len=500))(x, pos)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_a_decode_step_with_the_table_evaluates_cos_once(decode_step_fn):
  cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    ffn_dim=48, max_seq_len=64)
  params = jax.jit(Decoder(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tokens, pos = jnp.array([[3], [7]]), jnp.array([[5], [9]])

  step = lambda impl: decode_step_fn(cfg, impl, tokens, pos)
  plain, table = ModelImpl(), dataclasses.replace(ModelImpl(), rope_table=True)
  np.testing.assert_array_equal(step(table)(params), step(plain)(params))
  cosines = lambda impl: step(impl).lower(params).compile().as_text().count(" cosine(")
  assert cosines(table) == 1 and cosines(plain) >= cfg.num_layers
