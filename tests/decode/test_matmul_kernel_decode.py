"""Decode-step weight products in the C++ matrix kernel (kernels/matmul_cpu.py,
decode/backend.py `matmul`): where 'auto' picks it, that the compiled loop
calls it, and that it decodes the tokens of the XLA products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import backend as backend_module
from decode import processors as proc
from decode.config import GenerationConfig
from decode.generate import decode_fn, generate, packed_weights, plan_for
from kernels import matmul_cpu
from model.config import ModelConfig
from model.params import cast_weights
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=64, tie_embeddings=True)
PROMPTS = [[5, 7, 9, 11, 2], [3, 1, 4, 1, 5, 9, 2, 6], [8, 8, 1]]
ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)  # peakier distributions


def test_auto_picks_the_kernel_for_several_rows_and_bfloat16_on_one_device():
  greedy, beam = GenerationConfig(), GenerationConfig(strategy="beam", num_beams=2)
  picked = {(dtype, name, rows): backend_module.resolve(CFG.replace(dtype=dtype), gen, rows)
            for dtype in ("float32", "bfloat16") for name, gen in (("greedy", greedy),
                                                                  ("beam", beam))
            for rows in (1, 4)}
  if not ON_CPU:
    assert {b.impl.matmul for b in picked.values()} == {"xla"}
    return
  for (dtype, name, rows), b in picked.items():
    kernel = dtype == "bfloat16" or rows > 1 or name == "beam"
    assert b.impl.matmul == ("cpu_kernel" if kernel else "xla"), (dtype, name, rows)
    assert (b.impl.matmul_threads >= 1) == kernel
    if kernel:  # its threads share every weight read: one device
      assert b.num_devices == 1
  assert backend_module.resolve(CFG, GenerationConfig(matmul_impl="xla"), 4).impl.matmul == "xla"


@pytest.mark.skipif(not ON_CPU, reason="the C++ matrix kernel runs on the CPU backend only")
@pytest.mark.parametrize("strategy", [  # beam: the same kernel calls on W rows (-m slow)
    "greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_kernel_decodes_the_tokens_of_the_xla_products(params, strategy):
  gen = GenerationConfig(strategy=strategy, max_new_tokens=12, num_beams=2,
                         num_return_sequences=2 if strategy == "beam" else 1, num_devices=1,
                         matmul_impl="cpu_kernel", cache_growth=0)
  plan = plan_for(CFG, gen, 8, len(PROMPTS))
  assert plan.backend.impl.matmul == "cpu_kernel"
  hlo = decode_fn(CFG, plan).lower(
      params, jnp.ones((3, 8), jnp.int32), jnp.full((3,), 8, jnp.int32),
      proc.SamplingParams.create(3), jax.random.split(jax.random.key(0), 3),
      (np.float32(1.0), np.int32(1))).as_text()
  assert f"@{matmul_cpu.TARGET}(" in hlo
  assert f"@{matmul_cpu.PACK_TARGET}(" in hlo  # the loop's weights laid out once (pack_km)
  kernel = generate(CFG, params, PROMPTS, gen)
  xla = generate(CFG, params, PROMPTS, gen, matmul_impl="xla")
  assert kernel.backend.impl.matmul == "cpu_kernel" and xla.backend.impl.matmul == "xla"
  np.testing.assert_array_equal(kernel.tokens, xla.tokens)
  np.testing.assert_allclose(kernel.logprobs, xla.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="the C++ matrix kernel runs on the CPU backend only")
def test_bfloat16_weights_decode_alike(params):
  """bfloat16 weights and activations: the kernel (float32 sums of the
  bfloat16 operands) and XLA's products give the same greedy tokens here."""
  cfg, p16 = CFG.replace(dtype="bfloat16"), cast_weights(params, "bfloat16")
  gen = GenerationConfig(max_new_tokens=12, num_devices=1, cache_growth=0)
  kernel = generate(cfg, p16, PROMPTS, gen)
  xla = generate(cfg, p16, PROMPTS, gen, matmul_impl="xla")
  assert kernel.backend.impl.matmul == "cpu_kernel"
  np.testing.assert_array_equal(kernel.tokens, xla.tokens)


@pytest.mark.skipif(not ON_CPU, reason="the C++ matrix kernel runs on the CPU backend only")
def test_packed_weights_of_latent_attention_and_experts_decode_alike():
  """MLA (a q LoRA, per-head up-projections, an output over two contracted axes) with
  MoE blocks and an untied unembedding: every [K, M] product packed in the kernel gives
  XLA's tokens."""
  cfg = CFG.replace(attention="mla", kv_lora_rank=16, q_lora_rank=24, rope_head_dim=4,
                    num_experts=4, moe_top_k=2, moe_every=2, tie_embeddings=False)
  p = jax.jit(Decoder(cfg).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  p = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)
  gen = GenerationConfig(max_new_tokens=10, num_devices=1, matmul_impl="cpu_kernel",
                         cache_growth=0)
  kernel = generate(cfg, p, PROMPTS, gen)
  xla = generate(cfg, p, PROMPTS, gen, matmul_impl="xla")
  assert kernel.backend.loop_impl().matmul_packed
  assert "unembed" in packed_weights(cfg, p, kernel.backend.loop_impl())
  np.testing.assert_array_equal(kernel.tokens, xla.tokens)
  np.testing.assert_allclose(kernel.logprobs, xla.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_CPU, reason="the C++ matrix kernel runs on the CPU backend only")
def test_weights_are_laid_out_once_per_set_of_weights(params):
  """`packed_weights` holds every [K, M] projection's pack_km layout (of its 2-D view), is
  kept for the same params (not for others), and a program given it lays nothing out."""
  gen = GenerationConfig(max_new_tokens=6, num_devices=1, matmul_impl="cpu_kernel",
                         cache_growth=0)
  plan = plan_for(CFG, gen, 8, len(PROMPTS))
  impl = plan.backend.loop_impl()
  packed = packed_weights(CFG, params, impl)
  for i in range(CFG.num_layers):
    block, want = params[f"block_{i}"], packed[f"block_{i}"]
    views = {("attn", "w_qkv"): block["attn"]["w_qkv"].reshape(CFG.d_model, -1),
             ("attn", "w_o"): block["attn"]["w_o"].reshape(-1, CFG.d_model),
             ("ffn", "w_in"): block["ffn"]["w_in"], ("ffn", "w_out"): block["ffn"]["w_out"]}
    assert {(m, n) for m in want for n in want[m]} == set(views)
    for (m, n), w in views.items():
      np.testing.assert_array_equal(want[m][n], matmul_cpu.pack_km_reference(w))
  # the tied unembedding as its transpose's layout ('km' register tiles)
  assert set(packed) == {f"block_{i}" for i in range(CFG.num_layers)} | {"embed_T"}
  np.testing.assert_array_equal(packed["embed_T"], matmul_cpu.pack_km_reference(params["embed"].T))
  assert packed_weights(CFG, params, impl) is packed
  assert packed_weights(CFG, jax.tree.map(lambda x: x + 0, params), impl) is not packed
  # one weight replaced, not the first leaf: laid out anew, with the new weight
  tuned = {**params, "block_1": {**params["block_1"], "ffn": {
      **params["block_1"]["ffn"], "w_out": params["block_1"]["ffn"]["w_out"] * 2.0}}}
  retuned = packed_weights(CFG, tuned, impl)
  assert retuned is not packed
  np.testing.assert_array_equal(retuned["block_1"]["ffn"]["w_out"],
                                matmul_cpu.pack_km_reference(tuned["block_1"]["ffn"]["w_out"]))
  as_numpy = jax.tree.map(np.asarray, params)  # mutable leaves: never kept
  assert packed_weights(CFG, as_numpy, impl) is not packed_weights(CFG, as_numpy, impl)
  assert packed_weights(CFG, params, plan.backend.impl) is None  # a step called from Python
  args = (params, jnp.ones((3, 8), jnp.int32), jnp.full((3,), 8, jnp.int32),
          proc.SamplingParams.create(3), jax.random.split(jax.random.key(0), 3),
          (np.float32(1.0), np.int32(1)))
  hlo = decode_fn(CFG, plan).lower(*args, packed).as_text()
  assert f"@{matmul_cpu.TARGET}(" in hlo and f"@{matmul_cpu.PACK_TARGET}(" not in hlo
  given = decode_fn(CFG, plan)(*args, packed)
  in_graph = decode_fn(CFG, plan)(*args)
  np.testing.assert_array_equal(given["tokens"], in_graph["tokens"])
  np.testing.assert_array_equal(given["logprobs"], in_graph["logprobs"])


@pytest.mark.skipif(not ON_CPU, reason="the C++ matrix kernel runs on the CPU backend only")
def test_a_bfloat16_embedding_is_gathered_from_its_packed_bits(params):
  """A bf16 model's `packed_weights` holds the table's bits, and a program given them
  gathers from them: no bitcast copy of the whole table (there is one without), same
  tokens and logprobs."""
  cfg = CFG.replace(dtype="bfloat16")
  p = cast_weights(params, "bfloat16")
  gen = GenerationConfig(max_new_tokens=6, num_devices=1, matmul_impl="cpu_kernel",
                         cache_growth=0)
  plan = plan_for(cfg, gen, 8, len(PROMPTS))
  packed = packed_weights(cfg, p, plan.backend.loop_impl())
  np.testing.assert_array_equal(packed["embed_bits"],
                                jax.lax.bitcast_convert_type(p["embed"], jnp.uint16))
  assert "embed_bits" not in packed_weights(CFG, params, plan.backend.loop_impl())  # float32
  args = (p, jnp.ones((3, 8), jnp.int32), jnp.full((3,), 8, jnp.int32),
          proc.SamplingParams.create(3), jax.random.split(jax.random.key(0), 3),
          (np.float32(1.0), np.int32(1)))
  table = f"u16[{cfg.vocab_size},{cfg.d_model}]"
  def table_copies(*packed_arg):
    hlo = decode_fn(cfg, plan).lower(*args, *packed_arg).compile().as_text()
    return [l for l in hlo.splitlines()
            if f"= {table}" in l and any(op in l for op in (" fusion(", " bitcast-convert(", " copy("))]
  assert not table_copies(packed) and table_copies()
  given, in_graph = decode_fn(cfg, plan)(*args, packed), decode_fn(cfg, plan)(*args)
  np.testing.assert_array_equal(given["tokens"], in_graph["tokens"])
  np.testing.assert_array_equal(given["logprobs"], in_graph["logprobs"])
