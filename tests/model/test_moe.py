"""MoE layer against per-token references."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import moe_cpu
from model import dispatch
from model import moe as moe_lib
from model.config import ModelConfig
from model.impl import ModelImpl
from model.ffn import swiglu

N, D, F, E = 24, 8, 16, 4


def weights(seed=0, e=E):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (N, D))
  w_in = jax.random.normal(k[1], (e, D, 2 * F)) * 0.3
  w_out = jax.random.normal(k[2], (e, F, D)) * 0.3
  return x, w_in, w_out


def expert_np(x_D, w_in, w_out, e):
  h = x_D @ w_in[e]
  return np.asarray(swiglu(h)) @ w_out[e]


def run_layer(cfg, x_NxD, train=False, seed=0):
  layer = moe_lib.MoE(cfg)
  variables = layer.init(jax.random.key(seed), x_NxD[None])
  (y, stats) = layer.apply(variables, x_NxD[None], train)
  return variables["params"], y[0], stats


@pytest.mark.parametrize("gate", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_top_k_moe_matches_python_loop(gate, k, dispatch):
  cfg = ModelConfig(d_model=D, num_heads=1, num_kv_heads=1, ffn_dim=F, num_experts=E,
                    moe_top_k=k, moe_gate=gate, moe_dispatch=dispatch,
                    eval_capacity_factor=float(E))  # capacity N*k: nothing dropped
  x, _, _ = weights()
  params, y, stats = run_layer(cfg, x)
  w_gate, w_in, w_out = (np.asarray(params["router"]["w_gate"]), np.asarray(params["w_in"]),
                         np.asarray(params["w_out"]))
  ref = np.zeros((N, D), np.float32)
  for n in range(N):
    logits = np.asarray(x[n]) @ w_gate
    top = np.argsort(-logits)[:k]
    if gate == "softmax_topk":
      p = np.exp(logits - logits.max()); p /= p.sum()
      g = p[top]
    else:
      g = np.exp(logits[top] - logits[top].max()); g /= g.sum()
    for gi, e in zip(g, top):
      ref[n] += gi * expert_np(np.asarray(x[n]), w_in, w_out, e)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert float(stats.dropped) == 0.0


def test_dense_moe_is_weighted_sum_of_all_experts():
  cfg = ModelConfig(d_model=D, num_heads=1, num_kv_heads=1, ffn_dim=F, num_experts=E,
                    moe_mode="dense")
  x, _, _ = weights()
  params, y, _ = run_layer(cfg, x)
  p = jax.nn.softmax(x @ params["router"]["w_gate"], -1)
  ref = sum(p[:, e:e + 1] * jnp.stack([expert_np(x[n], params["w_in"], params["w_out"], e)
                                       for n in range(N)]) for e in range(E))
  np.testing.assert_allclose(y, ref, atol=1e-5)


def routing(seed, k, e=E):
  logits = jax.random.normal(jax.random.key(seed + 100), (N, e)) * 2
  top_logits, expert = jax.lax.top_k(logits, k)
  return expert.astype(jnp.int32), jax.nn.softmax(top_logits, -1)


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_capacity_without_drops(k):
  x, w_in, w_out = weights(1)
  expert, gate = routing(1, k)
  y_cap, kept = jax.jit(moe_lib.capacity_moe, static_argnames="capacity")(
      x, expert, gate, w_in, w_out, capacity=N * k)
  assert bool(kept.all())
  y_drop = jax.jit(moe_lib.dropless_moe)(x, expert, gate, w_in, w_out)
  np.testing.assert_allclose(y_cap, y_drop, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
@pytest.mark.parametrize("capacity", [1, 3, 5])
def test_capacity_drops_exactly_the_overflow(dispatch, capacity):
  """Per expert, the first `capacity` assignments in priority order (all first
  choices in token order, then second choices) are kept; the rest give 0."""
  k = 2
  x, w_in, w_out = weights(2)
  expert, gate = routing(2, k)
  y, kept = moe_lib.capacity_moe(x, expert, gate, w_in, w_out, capacity, dispatch)
  e_np, g_np = np.asarray(expert), np.asarray(gate)
  used = np.zeros(E, int)
  kept_ref = np.zeros((N, k), bool)
  for j in range(k):
    for n in range(N):
      if used[e_np[n, j]] < capacity:
        kept_ref[n, j] = True
      used[e_np[n, j]] += 1
  np.testing.assert_array_equal(kept, kept_ref)
  assert (~kept_ref).any()  # the case really overflows
  ref = np.zeros((N, D), np.float32)
  for n in range(N):
    for j in range(k):
      if kept_ref[n, j]:
        ref[n] += g_np[n, j] * expert_np(x[n], w_in, w_out, e_np[n, j])
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_dropped_fraction_and_residual_passthrough():
  """A token whose every assignment is dropped leaves the block unchanged."""
  cfg = ModelConfig(d_model=D, num_heads=1, num_kv_heads=1, ffn_dim=F, num_experts=E,
                    moe_top_k=1, capacity_factor=0.25)
  x, _, _ = weights(3)
  params, y, stats = run_layer(cfg, x, train=True)
  cap = moe_lib.expert_capacity(N, E, 1, 0.25)
  expert = jnp.argmax(x @ params["router"]["w_gate"], -1)
  _, kept = moe_lib.capacity_slots(expert[:, None], E, cap)
  np.testing.assert_allclose(float(stats.dropped), 1 - float(kept.mean()), atol=1e-6)
  assert float(stats.dropped) > 0
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(kept[:, 0])], 0.0)


def test_gradients_of_dispatch_paths_agree():
  x, w_in, w_out = weights(4)
  expert, gate = routing(4, 2)
  f = lambda fn: jax.grad(lambda a, b, c: (fn(a, b, c) ** 2).sum(), (0, 1, 2))(x, w_in, w_out)
  g_cap = f(lambda a, b, c: moe_lib.capacity_moe(a, expert, gate, b, c, 4)[0])
  g_ein = f(lambda a, b, c: moe_lib.capacity_moe(a, expert, gate, b, c, 4, "einsum")[0])
  g_big = f(lambda a, b, c: moe_lib.capacity_moe(a, expert, gate, b, c, N * 2)[0])
  g_drop = f(lambda a, b, c: moe_lib.dropless_moe(a, expert, gate, b, c))
  for a, b in zip(g_cap, g_ein):
    np.testing.assert_allclose(a, b, atol=1e-4)
  for a, b in zip(g_big, g_drop):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 5, 8, dispatch.SMALL_N, dispatch.SMALL_N + 40])
def test_dropless_small_and_grouped_paths_equal_capacity(n):
  """Every dropless path: gathered experts (N*A < X), the expert loop with its
  row buckets (impl='cpu', N <= SMALL_N), sorted grouped matmul beyond and
  for impl='xla' at every size."""
  k = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(k[0], (n, D))
  w_in = jax.random.normal(k[1], (E, D, 2 * F)) * 0.3
  w_out = jax.random.normal(k[2], (E, F, D)) * 0.3
  top_logits, expert = jax.lax.top_k(jax.random.normal(k[3], (n, E)), 2)
  gate = jax.nn.softmax(top_logits, -1)
  # Jitted: one compile per path instead of one per eager op and size.
  capacity = jax.jit(moe_lib.capacity_moe, static_argnames="capacity")
  dropless = jax.jit(moe_lib.dropless_moe, static_argnums=(5, 6))
  y_cap, _ = capacity(x, expert, gate, w_in, w_out, capacity=2 * n)
  for impl in ("xla", "cpu"):
    np.testing.assert_allclose(dropless(x, expert, gate, w_in, w_out, impl), y_cap, atol=1e-5)
  if jax.default_backend() == "cpu":  # the C++ CPU expert kernel (decode steps, N <= SMALL_N)
    for threads in (1, 2):
      np.testing.assert_allclose(dropless(x, expert, gate, w_in, w_out, "cpu_kernel", threads),
                                 y_cap, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, dispatch.SMALL_N, dispatch.SMALL_N + 1])
def test_kernel_threads_run_the_cpu_kernel_exactly_for_small_steps(n):
  """MoE with impl moe='cpu_kernel': the same output, and the program calls
  the C++ expert kernel exactly when N <= SMALL_N (a decode step)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the C++ expert kernel runs on the CPU backend only")
  cfg = ModelConfig(d_model=D, num_heads=1, num_kv_heads=1, ffn_dim=F, num_experts=8,
                    moe_top_k=2, moe_dispatch="dropless", vocab_size=11)
  x = jax.random.normal(jax.random.key(3), (1, n, D))
  layer = moe_lib.MoE(cfg)
  params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  y, _ = jax.jit(layer.apply)({"params": params}, x)
  kernel_layer = moe_lib.MoE(cfg, ModelImpl(moe="cpu_kernel", moe_threads=2))
  y_kernel, _ = jax.jit(kernel_layer.apply)({"params": params}, x)
  np.testing.assert_allclose(y_kernel, y, atol=1e-5)
  hlo = jax.jit(kernel_layer.apply).lower({"params": params}, x).as_text()
  assert (moe_cpu.TARGET in hlo) == (n <= dispatch.SMALL_N)
