"""model/linear.project: the decode-sized products (and bfloat16 products of any
size) run the C++ matrix kernel exactly when impl.matmul is 'cpu_kernel', with
the XLA dot's result; the model's layers and logits go through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import matmul_cpu
from model.config import ModelConfig
from model.impl import ModelImpl
from model.linear import DECODE_ROWS, project
from model.transformer import Decoder

KERNEL = ModelImpl(matmul="cpu_kernel", matmul_threads=2)
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the C++ matrix kernel runs on the CPU backend only")


@pytest.mark.parametrize("rows", [1, DECODE_ROWS, DECODE_ROWS + 1])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_exactly_for_decode_sized_products(rows, transpose_w, dtype):
  x = jax.random.normal(jax.random.key(0), (1, rows, 24))
  w = jax.random.normal(jax.random.key(1), (40, 24) if transpose_w else (24, 40))
  want = project(x, w, ModelImpl(), dtype, transpose_w)
  f = jax.jit(lambda x, w: project(x, w, KERNEL, dtype, transpose_w))
  got = f(x, w)
  assert got.dtype == want.dtype == jnp.dtype(dtype) and got.shape == (1, rows, 40)
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)
  # bfloat16 products of any size (a prefill) take the kernel too.
  assert (matmul_cpu.TARGET in f.lower(x, w).as_text()) == (rows <= DECODE_ROWS
                                                           or dtype == "bfloat16")


@pytest.mark.parametrize("tie", [True, False])
def test_decode_step_calls_the_kernel_for_every_weight_product(tie, decode_step_fn):
  """A cached decode step of the Decoder with impl matmul='cpu_kernel': four
  products a layer (qkv, out, FFN in, FFN out) and the unembedding, the
  logits of the XLA form."""
  cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_dim=48, max_seq_len=16, tie_embeddings=tie)
  params = jax.jit(Decoder(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tokens, pos = jnp.array([[3], [7]]), jnp.array([[0], [0]])

  step = lambda impl: decode_step_fn(cfg, impl, tokens, pos)
  want, got = step(ModelImpl())(params), step(KERNEL)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  hlo = step(KERNEL).lower(params).as_text()
  assert hlo.count(f"@{matmul_cpu.TARGET}(") == 4 * cfg.num_layers + 1
