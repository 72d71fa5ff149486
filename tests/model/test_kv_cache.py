"""KV cache: cached decode == full forward, per-row positions, functional updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.kv_cache import ContiguousSpec, update_rows
from model.transformer import Decoder

DENSE = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_dim=48, tie_embeddings=False, max_seq_len=64)
MOE = DENSE.replace(num_experts=4, moe_top_k=2, moe_dispatch="dropless", moe_every=2)


def _init(cfg, seed=0):
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


def test_update_rows_writes_each_row_at_its_own_offset():
  buf = jnp.zeros((3, 6, 2))
  new = jnp.arange(3 * 2 * 2, dtype=jnp.float32).reshape(3, 2, 2) + 1
  out = update_rows(buf, new, jnp.array([0, 3, 4]))
  expected = np.zeros((3, 6, 2))
  expected[0, 0:2], expected[1, 3:5], expected[2, 4:6] = new[0], new[1], new[2]
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(buf, 0)  # functional: input untouched


@pytest.mark.parametrize("fresh", [False, True], ids=["prefill-reads-cache", "prefill-fresh"])
@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_cached_decode_matches_full_forward_at_every_position(cfg, fresh):
  """Prefill (fresh: attention within the prompt only) + one-token steps."""
  model, params = _init(cfg)
  b, length, prefix = 2, 12, 5
  tokens = jax.random.randint(jax.random.key(1), (b, length), 0, cfg.vocab_size)
  full, _ = jax.jit(model.apply)({"params": params}, tokens)
  cache = ContiguousSpec().init(cfg, b, 16)
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  step = jax.jit(lambda t, p, c, f=False: model.apply({"params": params}, t, p, c, f,
                                                      method=Decoder.decode), static_argnums=3)
  logits, cache = step(tokens[:, :prefix], pos[:, :prefix], cache, fresh)
  got = [logits]
  for i in range(prefix, length):
    logits, cache = step(tokens[:, i:i + 1], pos[:, i:i + 1], cache)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_decode_as_if_alone():
  """Right-padded prompts, per-row write positions: each row equals its solo run."""
  cfg = MOE
  model, params = _init(cfg, seed=3)
  lens = [3, 7, 5]
  new = 4
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, cfg.vocab_size, n + new) for n in lens]
  apply = jax.jit(lambda t, p, c: model.apply({"params": params}, t, p, c, method=Decoder.decode))

  def run(rows_tokens, row_lens):
    bsz, width = len(rows_tokens), max(lens)  # solo rows padded alike: one compile
    prompt = np.full((bsz, width), 7, np.int32)  # padding garbage past each length
    for r, (t, n) in enumerate(zip(rows_tokens, row_lens)):
      prompt[r, :n] = t[:n]
    cache = ContiguousSpec().init(cfg, bsz, 16)
    logits, cache = apply(jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(width), (bsz, width)), cache)
    out = [logits[np.arange(bsz), np.array(row_lens) - 1]]
    for i in range(new):
      pos = np.array(row_lens)[:, None] + i
      tok = np.array([t[n + i] for t, n in zip(rows_tokens, row_lens)])[:, None]
      logits, cache = apply(jnp.asarray(tok), jnp.asarray(pos), cache)
      out.append(logits[:, 0])
    return np.stack(out, 1)

  together = run(rows, lens)
  for r in range(len(lens)):
    alone = run([rows[r]], [lens[r]])
    np.testing.assert_allclose(together[r], alone[0], atol=1e-5, rtol=1e-5)


def test_reorder_and_repeat_move_rows():
  cache = ContiguousSpec().init(DENSE, 2, 4)
  layer = cache.layers[0]
  cache = cache.replace_layers([layer.replace(k_BxTxKxE=layer.k_BxTxKxE + jnp.arange(2.0)[:, None, None, None])]
                               + list(cache.layers[1:]))
  rep = cache.repeat(2)
  np.testing.assert_array_equal(rep.layers[0].k_BxTxKxE[:, 0, 0, 0], [0, 0, 1, 1])
  ro = rep.reorder(jnp.array([3, 0, 0, 2]))
  np.testing.assert_array_equal(ro.layers[0].k_BxTxKxE[:, 0, 0, 0], [1, 0, 0, 1])


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_cached_attention_equals_grouped_attention_over_the_concatenation(impl):
  """attend_cached(cache, new) == attend over [cache; new] with the joint mask,
  in both implementations (the CPU block-diagonal form and the grouped one)."""
  from model.attention import attend, attend_cached
  ks = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(ks[0], (2, 3, 8, 16))
  k, v = jax.random.normal(ks[1], (2, 10, 2, 16)), jax.random.normal(ks[2], (2, 10, 2, 16))
  kn, vn = jax.random.normal(ks[4], (2, 3, 2, 16)), jax.random.normal(ks[5], (2, 3, 2, 16))
  cache_mask = jax.random.bernoulli(ks[3], 0.6, (2, 3, 10))
  new_mask = jax.random.bernoulli(ks[6], 0.6, (2, 3, 3)).at[:, :, 0].set(True)
  want = attend(q, jnp.concatenate([k, kn], 1), jnp.concatenate([v, vn], 1),
                jnp.concatenate([cache_mask, new_mask], -1))
  got = jax.jit(attend_cached, static_argnums=7)(q, k, v, cache_mask, kn, vn, new_mask, impl)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_logits_at_returns_only_the_requested_position_of_each_row():
  """Prefill's logits_at_B: row b's logits at position logits_at_B[b] only."""
  model, params = _init(DENSE)
  b, length = 3, 9
  tokens = jax.random.randint(jax.random.key(2), (b, length), 0, DENSE.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  empty = ContiguousSpec().init(DENSE, b, 16)
  full, _ = model.apply({"params": params}, tokens, pos, empty, True, method=Decoder.decode)
  at = jnp.array([8, 0, 4])
  one, cache = model.apply({"params": params}, tokens, pos, empty, True, at,
                           method=Decoder.decode)
  assert one.shape == (b, 1, DENSE.vocab_size)
  np.testing.assert_allclose(one[:, 0], full[jnp.arange(b), at], atol=1e-6, rtol=1e-6)
