"""Multi-head latent attention: absorbed decode == the training (expanded) forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.impl import ModelImpl
from model.kv_cache import ContiguousSpec
from model.latent_cache import LatentCache
from model.mla import MLA
from model.transformer import Decoder

BASE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, ffn_dim=48, max_seq_len=64,
            attention="mla", kv_lora_rank=16, rope_head_dim=8, nope_head_dim=8, v_head_dim=12)
CFGS = {"q_lora": ModelConfig(**BASE, q_lora_rank=12),
        "full_q_rotate_half": ModelConfig(**BASE, rope_interleave=False, tie_embeddings=False)}
T = 12


@functools.lru_cache(maxsize=None)
def built_model(name: str):
  """(cfg, random params, tokens, forward logits). Matrices at 1.5 / sqrt(fan-in)
  (attention far from uniform), norm scales around 1; numpy, so no init compiles."""
  cfg = CFGS[name]
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(0)

  def fill(path, x):
    if x.ndim == 1:
      return 1 + rng.uniform(-0.3, 0.3, x.shape).astype(np.float32)
    fan_in = x.shape[0] * (x.shape[1] if "w_o'" in jax.tree_util.keystr(path) else 1)
    return rng.normal(0, 1.5 / np.sqrt(fan_in), x.shape).astype(np.float32)
  p = jax.tree_util.tree_map_with_path(fill, shapes)
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
  ref, _ = jax.jit(Decoder(cfg).apply)({"params": p}, tokens)
  return cfg, p, tokens, np.asarray(ref)


def run_steps(cfg, params, tokens, mla: str, chunks):
  """Decodes `tokens` in steps of the given sizes (the first a fresh prefill if
  it is longer than one token), all in one jitted program; returns (logits at
  every position, cache)."""
  model = Decoder(cfg, ModelImpl(mla=mla))

  @jax.jit
  def run(params, tokens):
    cache = ContiguousSpec(mla=mla).init(cfg, tokens.shape[0], T + 4)
    out, start = [], 0
    for i, n in enumerate(chunks):
      pos = jnp.broadcast_to(jnp.arange(start, start + n), (tokens.shape[0], n))
      logits, cache = model.apply({"params": params}, tokens[:, start:start + n], pos, cache,
                                  i == 0 and n > 1, method=Decoder.decode)
      out.append(logits)
      start += n
    return jnp.concatenate(out, axis=1), cache

  assert sum(chunks) == T
  logits, cache = run(params, tokens)
  return np.asarray(logits), cache


@pytest.mark.parametrize("name", sorted(CFGS))
def test_absorbed_decode_equals_the_expanded_forward_at_every_position(name):
  """Steps of 1-5 tokens (causal within a step) from an empty cache, so that
  every position is decoded by absorbed steps: its logits are those of the
  training forward (per-head K/V up-projected from the latent). The latent
  cache holds exactly C + R = 16 + 8 values per token and layer.
  (Expanded decode: tests/decode/test_mla_decode.py.)"""
  cfg, params, tokens, ref = built_model(name)
  got, cache = run_steps(cfg, params, tokens, "absorbed", [1, 2, 1, 3, 5])
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  rows, slots = tokens.shape[0], T + 4
  leaves = jax.tree.leaves(cache)
  assert isinstance(cache, LatentCache)
  assert [x.shape for x in leaves] == [(rows, slots, 16 + 8)] * cfg.num_layers
  assert sum(x.size for x in leaves) == rows * slots * cfg.num_layers * (16 + 8)


def test_absorbed_steps_after_a_fresh_prefill():
  """The prefill attends within the prompt (expanded) and writes the latents
  that the absorbed steps then read."""
  cfg, params, tokens, ref = built_model("full_q_rotate_half")
  got, _ = run_steps(cfg, params, tokens, "absorbed", [5, 1, 3, 1, 2])
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_absorbed_step_rejects_a_cache_without_latents():
  cfg, params, tokens, _ = built_model("q_lora")
  kv = ContiguousSpec(mla="expanded").init(cfg, 2, T)
  step = jax.jit(lambda t, c: Decoder(cfg).apply({"params": params}, t, jnp.zeros((2, 1), jnp.int32),
                                                 c, method=Decoder.decode))
  with pytest.raises(ValueError, match="impl.mla='absorbed' needs a cache"):
    step(tokens[:, :1], kv)  # raised while tracing


def test_scale_is_one_over_sqrt_of_nope_plus_rope_not_of_the_latent():
  """The layer equals attention written out with scale 1 / sqrt(nope + R) =
  1 / sqrt(16) (the latent width C + R = 24 would give another result)."""
  cfg = CFGS["q_lora"]
  x = jax.random.normal(jax.random.key(2), (1, 5, cfg.d_model))
  pos = jnp.arange(5)[None]
  mla = MLA(cfg)
  v = {"params": built_model("q_lora")[1]["block_0"]["attn"]}
  @jax.jit
  def both(v, x):
    q_nope, q_rope, c_kv, k_rope = mla.apply(v, x, pos, method=MLA.project)
    k, val = mla.apply(v, c_kv, k_rope, method=MLA.expand)
    q = jnp.concatenate([q_nope, q_rope], -1)
    s = jnp.einsum("blhe,bthe->bhlt", q, k) / np.sqrt(8 + 8)
    s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -jnp.inf)
    o = jnp.einsum("bhlt,bthv->blhv", jax.nn.softmax(s, -1), val)
    return mla.apply(v, x, pos)[0], mla.apply(v, o, method=MLA.out)

  got, want = both(v, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
