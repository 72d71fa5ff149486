"""Decoder-level properties: causality, GQA == MHA, tied/untied, aux output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.transformer import Decoder, take_rows
from model import attention

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
            ffn_dim=64, max_seq_len=64)


def init(cfg, length=12):
  model = Decoder(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, length), 0, cfg.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # one compile, not one per op
  return model, params, tokens


@pytest.mark.parametrize("extra", [{}, {"num_kv_heads": 1},
                                   {"num_experts": 4, "moe_top_k": 2,
                                    "moe_dispatch": "dropless"}])
def test_causality(extra):
  model, params, tokens = init(ModelConfig(**{**TINY, **extra}))
  apply = jax.jit(model.apply)
  logits, _ = apply({"params": params}, tokens)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 64)
  logits2, _ = apply({"params": params}, changed)
  np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-5)
  assert np.abs(logits[:, 7:] - logits2[:, 7:]).max() > 1e-3


def test_gqa_with_all_kv_heads_equals_mha():
  """GQA attention with K == H is per-head attention (independent reference)."""
  b, l, h, e = 2, 6, 4, 8
  q, k, v = jax.random.normal(jax.random.key(0), (3, b, l, h, e))
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  out = attention.attend(q, k, v, attention.causal_mask(pos, pos))
  s = jnp.einsum("blhe,bshe->bhls", q, k) / np.sqrt(e)
  s = jnp.where(jnp.tril(jnp.ones((l, l), bool)), s, -jnp.inf)
  ref = jnp.einsum("bhls,bshe->blhe", jax.nn.softmax(s, -1), v)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
  """K < H: each group of H/K query heads sees the same K/V head."""
  b, l, h, kv, e = 2, 5, 6, 2, 4
  q = jax.random.normal(jax.random.key(0), (b, l, h, e))
  k, v = jax.random.normal(jax.random.key(1), (2, b, l, kv, e))
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  mask = attention.causal_mask(pos, pos)
  out = attention.attend(q, k, v, mask)
  rep = lambda t: jnp.repeat(t, h // kv, axis=2)
  np.testing.assert_allclose(out, attention.attend(q, rep(k), rep(v), mask), atol=1e-5)


def test_untied_embeddings_and_dense_aux():
  model, params, tokens = init(ModelConfig(**{**TINY, "tie_embeddings": False}))
  assert params["unembed"].shape == (32, 64)
  logits, aux = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  assert float(aux["loss"]) == 0.0


def test_moe_every_places_moe_blocks_and_stacks_stats():
  cfg = ModelConfig(**{**TINY, "num_layers": 4}, num_experts=4, moe_every=2)
  model, params, tokens = init(cfg)
  assert [("moe" in params[f"block_{i}"]) for i in range(4)] == [False, True, False, True]
  _, aux = model.apply({"params": params}, tokens)
  assert aux["stats"].expert_frac_X.shape == (2, 4)
  np.testing.assert_allclose(aux["stats"].expert_frac_X.sum(-1), 1.0, atol=1e-6)
  assert float(aux["loss"]) > 0


def test_take_rows_is_take_with_its_gradient_and_no_float32_table_copy():
  """A bf16 table's rows are gathered as bits: same rows, same gradient as
  jnp.take, and a loop that reads one row a step holds no float32 copy of it."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray([[1, 6], [0, 6]])
  for dt in (jnp.bfloat16, jnp.float16, jnp.float32):
    t = jnp.asarray(rng.standard_normal((7, 3)), dt)
    np.testing.assert_array_equal(take_rows(t, ids), jnp.take(t, ids, axis=0))
    loss = lambda f: lambda t: (f(t).astype(jnp.float32) ** 2).sum()
    np.testing.assert_array_equal(jax.grad(loss(lambda t: take_rows(t, ids)))(t),
                                  jax.grad(loss(lambda t: jnp.take(t, ids, axis=0)))(t))
  table = jnp.ones((4099, 64), jnp.bfloat16)

  def loop(t):
    body = lambda k, acc: acc + take_rows(t, (k * 7 + acc[:1, 0].astype(jnp.int32)) % 4099
                                          ).astype(jnp.float32)
    return jax.lax.fori_loop(0, 5, body, jnp.zeros((1, 64), jnp.float32))
  assert "f32[4099,64]" not in jax.jit(loop).lower(table).compile().as_text()
