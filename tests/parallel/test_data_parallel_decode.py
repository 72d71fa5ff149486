"""Row-parallel decoding (decode/data_parallel.py) on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import data_parallel
from decode import processors as proc
from decode.config import GenerationConfig
from decode.generate import decode_fn, generate, plan_for
from model.config import ModelConfig
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=64, num_experts=4, moe_top_k=2, moe_every=2,
                  moe_dispatch="dropless")
# Different lengths, so the devices' loops run for different numbers of steps.
PROMPTS = [[1, 5, 9], [1, 30], [1, 7, 7, 7, 2, 40, 11], [1, 22, 3, 4],
           [1, 8], [1, 50, 49, 48, 47], [1, 12, 13], [1, 2, 3, 4, 5, 6]]


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


def _assert_same(a, b):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@pytest.mark.parametrize("strategy,kw,prompts,devices", [
    ("greedy", {}, PROMPTS, (2, 8)),
    ("sample", dict(num_return_sequences=2, temperature=0.9, top_k=(0, 10, 20, 5)), PROMPTS[:4],
     (4,)),
    ("beam", dict(num_beams=3, length_penalty=0.6, num_return_sequences=2), PROMPTS[:4], (2,)),
])
def test_results_do_not_depend_on_the_number_of_devices(params, strategy, kw, prompts, devices):
  free = generate(CFG, params, prompts[:1], strategy="greedy", max_new_tokens=12)
  eos = int(free.tokens[0, 4])  # some rows stop early, the others run to the end
  one = generate(CFG, params, prompts, strategy=strategy, max_new_tokens=12, eos_token_id=eos,
                 seed=5, num_devices=1, **kw)
  assert len(set(one.lengths.tolist())) > 1
  for n in devices:
    _assert_same(one, generate(CFG, params, prompts, strategy=strategy, max_new_tokens=12,
                               eos_token_id=eos, seed=5, num_devices=n, **kw))


def test_default_uses_the_devices_that_divide_the_rows(params):
  assert jax.local_device_count() == 8
  assert [data_parallel.auto_num_devices(r) for r in (1, 3, 4, 6, 8, 16)] == [1, 3, 4, 6, 8, 8]
  _assert_same(generate(CFG, params, PROMPTS[:6], max_new_tokens=5, num_devices=1),
               generate(CFG, params, PROMPTS[:6], max_new_tokens=5, matmul_impl="xla"))  # 6
  # With the C++ matrix kernel (auto for several rows on CPU) its threads share
  # every weight read instead: one device.
  kernel = plan_for(CFG, GenerationConfig(max_new_tokens=5), 8, 6).backend
  assert kernel.num_devices == (1 if kernel.impl.matmul == "cpu_kernel" else 6)
  with pytest.raises(ValueError, match="divide"):
    generate(CFG, params, PROMPTS[:3], max_new_tokens=5, num_devices=2)


def test_replicate_shares_one_host_buffer_between_cpu_devices(params):
  rep = data_parallel.replicate(params, 4)
  for leaf, orig in zip(jax.tree.leaves(rep), jax.tree.leaves(params)):
    assert leaf.sharding.is_fully_replicated and len(leaf.addressable_shards) == 4
    pointers = {s.data.unsafe_buffer_pointer() for s in leaf.addressable_shards}
    assert len(pointers) == 1, "each CPU device got its own copy"
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(orig))
  assert jax.tree.leaves(data_parallel.replicate(rep, 4))[0] is jax.tree.leaves(rep)[0]


def test_split_rows_compile_without_ynnpack_fusions(params):
  """Several CPU devices each run their own rows' loop: decode_fn compiles
  them with no YNNPACK fusion (decode/backend.py ROW_SPLIT_OPTIONS), whose
  ops would wait for the core of the other device."""
  args = (data_parallel.replicate(params, 2), jnp.ones((2, 8), jnp.int32),
          jnp.full((2,), 8, jnp.int32), proc.SamplingParams.create(2),
          jax.random.split(jax.random.key(0), 2), (np.float32(1.0), np.int32(1)))
  fn = decode_fn(CFG, plan_for(CFG, GenerationConfig(max_new_tokens=4, num_devices=2), 8, 2))
  hlo = fn.lower(*args).compile().as_text()
  assert " while(" in hlo and "__ynn_fusion" not in hlo


def test_split_rows_keeps_row_order():
  fn = data_parallel.split_rows(lambda w, x: {"y": x * w + jnp.arange(x.shape[0])[:, None]},
                                4, replicated_args=(0,))
  x = jnp.arange(16.0).reshape(8, 2)
  local = jnp.tile(jnp.arange(2), 4)[:, None]  # each device numbers its own 2 rows
  np.testing.assert_array_equal(jax.jit(fn)(jnp.float32(2.0), x)["y"], x * 2 + local)
