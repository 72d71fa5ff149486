"""The C++ CPU expert kernel against its plain-XLA reference and the MoE
dispatch, for row counts that put 0, 1 or many rows on an expert, widths that
are not multiples of the kernel's 8-row passes or 16-float vectors, and any
number of threads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import moe_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="a CPU kernel: needs the CPU backend")


def problem(n, k, e, d, f, seed=0, skew=False):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (n, d))
  logits = jax.random.normal(ks[1], (n, e)) + (jnp.arange(e) * -3.0 if skew else 0.0)
  top, expert = jax.lax.top_k(logits, k)
  gate = jax.nn.softmax(top, -1)
  w_in = jax.random.normal(ks[2], (e, d, 2 * f)) / np.sqrt(d)
  w_out = jax.random.normal(ks[3], (e, f, d)) / np.sqrt(f)
  return x, expert.astype(jnp.int32), gate, w_in, w_out


def test_builds_on_cpu():
  """The kernel compiles here (a C++ compiler is part of the CPU setup)."""
  assert moe_cpu.available(), moe_cpu.build_error()


@pytest.mark.parametrize("n,k,e,d,f", [(1, 2, 8, 256, 512), (8, 2, 8, 256, 512),
                                       (5, 1, 4, 24, 40), (3, 3, 6, 37, 19), (64, 2, 8, 32, 48)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_equals_reference(n, k, e, d, f, threads):
  x, expert, gate, w_in, w_out = problem(n, k, e, d, f)
  want = moe_cpu.moe_ffn_reference(x, expert, gate, w_in, w_out)
  got = jax.jit(moe_cpu.moe_ffn, static_argnames="threads")(x, expert, gate, w_in, w_out,
                                                           threads=threads)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_skewed_routing_unused_experts_and_more_threads_than_rows():
  """Most rows on one expert, several experts unused, threads > D: the same sum."""
  x, expert, gate, w_in, w_out = problem(16, 2, 8, 6, 5, seed=1, skew=True)
  assert len(np.unique(np.asarray(expert))) < 8
  want = moe_cpu.moe_ffn_reference(x, expert, gate, w_in, w_out)
  for threads in (1, 4, 64):
    got = moe_cpu.moe_ffn(x, expert, gate, w_in, w_out, threads=threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_is_the_per_token_sum():
  """The reference itself: y[n] = sum_j gate[n, j] * SwiGLU_{expert[n, j]}(x[n])."""
  x, expert, gate, w_in, w_out = (np.asarray(a, np.float64) if a.dtype != jnp.int32 else
                                  np.asarray(a) for a in problem(4, 2, 4, 8, 6, seed=2))
  want = np.zeros_like(x)
  for i in range(4):
    for j in range(2):
      h = x[i] @ w_in[expert[i, j]]
      g, u = h[:6], h[6:]
      want[i] += gate[i, j] * ((g / (1 + np.exp(-g)) * u) @ w_out[expert[i, j]])
  got = moe_cpu.moe_ffn_reference(*(jnp.asarray(a, jnp.float32) if a.dtype != np.int32 else
                                    jnp.asarray(a) for a in (x, expert, gate, w_in, w_out)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inside_while_loop_and_vmap():
  """As a decode step uses it (inside a loop), and batched by vmap (sequential)."""
  x, expert, gate, w_in, w_out = problem(4, 2, 8, 32, 16, seed=3)
  step = lambda f: lambda i, y: y + 0.1 * f(y, expert, gate, w_in, w_out)
  loop = lambda f: jax.jit(lambda y: jax.lax.fori_loop(0, 3, step(f), y))
  np.testing.assert_allclose(loop(lambda *a: moe_cpu.moe_ffn(*a, threads=2))(x),
                             loop(moe_cpu.moe_ffn_reference)(x), rtol=1e-5, atol=1e-5)
  xs = jnp.stack([x, 2 * x])
  got = jax.vmap(lambda x: moe_cpu.moe_ffn(x, expert, gate, w_in, w_out, threads=2))(xs)
  want = jax.vmap(lambda x: moe_cpu.moe_ffn_reference(x, expert, gate, w_in, w_out))(xs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
