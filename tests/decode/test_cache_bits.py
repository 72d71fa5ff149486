"""A bfloat16 model on CPU keeps its KV cache, contiguous or paged, as bfloat16 bits in
uint16 buffers (decode/backend.py `cache`, model/cache.py BF16_BITS): where 'auto'
picks them, that the compiled loop writes them in place (no float32 copy of a cache
buffer), that it decodes what the float32 cache of the same values decodes, and that
the serving engine's pools hold them and serve what `generate` decodes alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import processors as proc
from decode.backend import resolve
from decode.config import GenerationConfig
from decode.engine import Engine, Request
from decode.generate import decode_fn, generate, plan_for
from kernels import paged_attention_cpu
from model.config import ModelConfig
from model.params import cast_weights
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=61, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=64, dtype="bfloat16")
ON_CPU = jax.default_backend() == "cpu"
NEEDS_KERNEL = pytest.mark.skipif(not ON_CPU or not paged_attention_cpu.available(),
                                  reason="the C++ attention kernel runs on the CPU backend only")


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return cast_weights(jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p), "bfloat16")


def test_auto_picks_bits_for_a_bfloat16_contiguous_cache_on_cpu():
  gen = GenerationConfig(max_new_tokens=4)
  want = "uint16" if ON_CPU else None
  assert resolve(CFG, gen, 3).cache_dtype == want
  assert resolve(CFG.replace(dtype="float32"), gen, 3).cache_dtype is None
  paged = GenerationConfig(max_new_tokens=4, kv_cache="paged", page_size=8)
  assert resolve(CFG, paged, 3).cache_dtype == want
  xla = GenerationConfig(max_new_tokens=4, attention_impl="xla")  # not the kernel: float32
  assert resolve(CFG, xla, 3).cache_dtype == ("float32" if ON_CPU else None)
  mla = CFG.replace(attention="mla", kv_lora_rank=16, rope_head_dim=8)
  assert resolve(mla, gen, 3).cache_dtype == ("float32" if ON_CPU else None)


@NEEDS_KERNEL
def test_the_bits_cache_is_written_in_place_and_decodes_like_float32(params):
  gen = GenerationConfig(max_new_tokens=12, num_devices=1, cache_growth=0)
  rows, width = 3, 8
  plan = plan_for(CFG, gen, width, rows)
  assert plan.backend.cache_dtype == "uint16"
  as_f32 = dataclasses.replace(plan, backend=dataclasses.replace(plan.backend,
                                                                 cache_dtype="float32"))
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, 61, (rows, width)), jnp.int32)
  args = (params, prompts, jnp.asarray([8, 5, 3], jnp.int32), proc.SamplingParams.create(rows),
          jax.random.split(jax.random.key(0), rows), (np.float32(1.0), np.int32(1)))
  cache = f"[{rows},{width + gen.max_new_tokens},{CFG.num_kv_heads},{CFG.dim_per_head}]"
  hlo = decode_fn(CFG, plan).lower(*args).compile().as_text()
  assert f"u16{cache}" in hlo
  # bfloat16 buffers are updated through a float32 copy of all of them (XLA:CPU)
  assert not [l for l in hlo.splitlines() if f"f32{cache}" in l or f"bf16{cache}" in l]
  assert f"f32{cache}" in decode_fn(CFG, as_f32).lower(*args).compile().as_text()
  bits, f32 = decode_fn(CFG, plan)(*args), decode_fn(CFG, as_f32)(*args)
  np.testing.assert_array_equal(bits["tokens"], f32["tokens"])
  np.testing.assert_allclose(bits["logprobs"], f32["logprobs"], rtol=1e-5, atol=1e-5)


@NEEDS_KERNEL
def test_the_engine_serves_from_bits_pools_what_generate_decodes_alone(params):
  rng = np.random.default_rng(1)
  requests = [Request(tuple(int(t) for t in rng.integers(3, 61, int(rng.integers(2, 9)))),
                      GenerationConfig(max_new_tokens=int(rng.choice([5, 9]))))
              for _ in range(6)]
  engine = Engine(CFG, params, requests, max_batch=4, page_size=4, chunk=4, prefill_rows=1)
  pools = engine._empty_state().cache.layers[0]
  assert pools.k_pages_KxPxSxE.dtype == pools.v_pages_KxPxSxE.dtype == jnp.uint16
  for r, c in zip(requests, engine.run()):
    alone = generate(CFG, params, [list(r.prompt)], r.gen, num_devices=1)
    np.testing.assert_array_equal(c.tokens, alone.tokens[0][:len(c.tokens)])
    assert len(c.tokens) == r.gen.max_new_tokens
