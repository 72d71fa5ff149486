"""Bucket + overflow-tile grouped matmul (the CPU path) against ragged_dot and
per-group matmuls, for balanced, skewed and empty groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import gmm, grouped_mlp, tiled_gmm
from model.ffn import swiglu


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 9], [0, 0, 32, 0, 0], [3, 3, 3, 3, 3]])
@pytest.mark.parametrize("expected_rows,tile", [(None, None), (None, 16), (200, 8)])
def test_tiled_equals_ragged_dot_values_and_grads(sizes, expected_rows, tile):
  m, k, n = 40, 6, 10  # rows past sum(sizes) belong to no group
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k))
  w = jax.random.normal(kw, (len(sizes), k, n))
  gs = jnp.array(sizes, jnp.int32)
  with jax.default_matmul_precision("float32"):  # no TF32 on GPU
    check_against_ragged_dot(x, w, gs, sizes, expected_rows, tile)


def check_against_ragged_dot(x, w, gs, sizes, expected_rows, tile):
  n = w.shape[-1]
  loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) * jnp.arange(n)).sum()
  tiled = jax.value_and_grad(loss(lambda x, w: tiled_gmm(x, w, gs, expected_rows, tile)), (0, 1))(x, w)
  ragged = jax.value_and_grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, gs)), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(ragged)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
  out = np.asarray(tiled_gmm(x, w, gs, expected_rows, tile))
  starts = np.cumsum([0] + sizes)
  for g in range(len(sizes)):
    np.testing.assert_allclose(out[starts[g]:starts[g + 1]],
                               np.asarray(x[starts[g]:starts[g + 1]] @ w[g]), rtol=1e-5,
                               atol=1e-5)
  assert not out[starts[-1]:].any()


def test_impl_choice_and_tile():
  x, w, gs = jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([1, 3], jnp.int32)
  np.testing.assert_array_equal(gmm(x, w, gs, "ragged"), gmm(x, w, gs, "tiled"))
  with pytest.raises(ValueError, match="impl must be one of"):
    gmm(x, w, gs, "cuda")
  np.testing.assert_array_equal(gmm(x, w, gs, "tiled", expected_rows=1), gmm(x, w, gs, "ragged"))


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 9], [0, 0, 32, 0, 0]])
def test_grouped_mlp_equals_two_ragged_dots(sizes):
  kx, ki, ko = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (40, 6))
  w_in = jax.random.normal(ki, (len(sizes), 6, 2 * 7))
  w_out = jax.random.normal(ko, (len(sizes), 7, 5))
  gs = jnp.array(sizes, jnp.int32)
  probe = jax.random.normal(jax.random.key(2), (40, 5))
  loss = lambda impl: lambda x, a, b: jnp.sum(grouped_mlp(x, a, b, gs, swiglu, impl=impl) * probe)
  with jax.default_matmul_precision("float32"):
    tiled = jax.value_and_grad(loss("tiled"), (0, 1, 2))(x, w_in, w_out)
    ragged = jax.value_and_grad(loss("ragged"), (0, 1, 2))(x, w_in, w_out)
  for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(ragged)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
