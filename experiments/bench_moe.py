"""MoE dispatch benchmark: one-hot einsum vs sorted dropless vs expert parallel.

  python -m experiments.bench_moe [--tokens=4096 --d_model=256 --ffn_dim=512 --devices=8]

For E in {8, 64} and k in {1, 2}, times one jitted forward + backward pass
(gradients w.r.t. the tokens and both expert weights) of the expert layer
(dispatch + SwiGLU experts + combine; the router is outside the timed part)
over N tokens of width D, and prints side by side:

  einsum     capacity_moe(dispatch='einsum'): Switch/GShard one-hot dispatch
             and combine tensors [N, E, C], one device.
  gather     capacity_moe (the default): index scatter/gather, one device.
  dropless   dropless_moe: sort by expert + grouped matmul, one device.
  ep-cap     expert parallel, capacity (all_to_all of [E, Cs, D] buffers),
             on a (data=1, expert=devices) mesh.
  ep-drop    expert parallel, dropless; exchange 'auto' (padded on CPU).

Bytes column ("MB"), from buffer shapes, float32, one forward pass (the
backward pass moves the same again):
  one device: bytes written into plus read out of the expert buffers by the
    dispatch and the combine (what an expert-parallel layer has to exchange);
  expert parallel: all_to_all payload leaving the devices, both directions,
    summed over devices (each device's chunk to itself stays local). The
    ragged exchange (GPU/TPU) would send only real rows: ~2 N k D 4 (X-1)/X.

On CPU the "devices" are fake (`--xla_force_host_platform_device_count`):
they share the machine's cores, so the EP columns measure the overhead of the
sharded program, not a speedup.
"""

import os

from experiments import host_devices

host_devices.request("devices", 8)  # fake CPU devices for the expert-parallel columns

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from model import dispatch, expert_parallel  # noqa: E402
from model.router import Routing, top_k_gates  # noqa: E402

_TOKENS = flags.DEFINE_integer("tokens", 4096, "N tokens per step.")
_D = flags.DEFINE_integer("d_model", 256, "D.")
_F = flags.DEFINE_integer("ffn_dim", 512, "F, expert hidden width.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Expert-axis size of the EP mesh.")
_FACTOR = flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor (capacity paths).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (after one warm-up); the fastest counts.")
_EXPERTS = flags.DEFINE_list("experts", ["8", "64"], "E values.")
_TOPK = flags.DEFINE_list("top_k", ["1", "2"], "k values.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

PATHS = ("einsum", "gather", "dropless", "ep-cap", "ep-drop")
F32 = 4


def make_inputs(n, d, f, e, k, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (n, d))
  logits = x @ (jax.random.normal(ks[1], (d, e)) * d ** -0.5)
  expert, gate, probs = top_k_gates(logits, k, "topk_softmax")
  routing = Routing(logits_NxX=logits, probs_NxX=probs, expert_NxA=expert, gate_NxA=gate)
  w_in = jax.random.normal(ks[2], (e, d, 2 * f)) * d ** -0.5
  w_out = jax.random.normal(ks[3], (e, f, d)) * f ** -0.5
  probe = jax.random.normal(ks[4], (n, d))
  return x, routing, w_in, w_out, probe


def layer_fn(path, routing, capacity, mesh):
  """(x, w_in, w_out) -> y_NxD for one path."""
  if path in ("einsum", "gather"):
    return lambda x, wi, wo: dispatch.capacity_moe(x, routing.expert_NxA, routing.gate_NxA,
                                                   wi, wo, capacity, path)[0]
  if path == "dropless":
    return lambda x, wi, wo: dispatch.dropless_moe(x, routing.expert_NxA, routing.gate_NxA,
                                                   wi, wo)
  mode = "capacity" if path == "ep-cap" else "dropless"
  return lambda x, wi, wo: expert_parallel.expert_parallel_moe(
      x, routing, wi, wo, mesh, dispatch=mode, capacity_factor=_FACTOR.value)[0]


def exchanged_bytes(path, n, d, e, k, capacity, x_size):
  """Forward-pass bytes moved by the dispatch + combine (see module docstring)."""
  n_loc = n // x_size
  leave = (x_size - 1) / x_size
  if path == "einsum" or path == "gather":
    return 2 * e * capacity * d * F32
  if path == "dropless":
    return 2 * n * k * d * F32
  if path == "ep-cap":
    buf = e * min(capacity, n_loc) * d * F32
  else:
    buf = x_size * n_loc * min(k, e // x_size) * d * F32
  return int(2 * x_size * buf * leave)


def time_path(path, inputs, capacity, mesh):
  x, routing, w_in, w_out, probe = inputs
  f = layer_fn(path, routing, capacity, mesh)
  step = jax.jit(jax.value_and_grad(lambda x, wi, wo: jnp.sum(f(x, wi, wo) * probe),
                                    argnums=(0, 1, 2)))
  ctx = jax.set_mesh(mesh) if path.startswith("ep") else _NoMesh()
  with ctx:
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, w_in, w_out))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      out = jax.block_until_ready(step(x, w_in, w_out))
      times.append(time.perf_counter() - t0)
  return float(np.min(times)), compile_s, out  # min: least disturbed by other load


class _NoMesh:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def max_diff(a, b) -> float:
  """Largest |a - b| / max|b| over the leaves (value and gradients)."""
  return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv):
  del argv
  n, d, f, x_size = _TOKENS.value, _D.value, _F.value, _DEVICES.value
  if jax.device_count() < x_size:
    raise SystemExit(f"need {x_size} devices, have {jax.device_count()} (set XLA_FLAGS)")
  mesh = jax.make_mesh((1, x_size), ("data", "expert"), (AxisType.Auto,) * 2,
                       devices=jax.devices()[:x_size])
  print(f"N={n} D={d} F={f} capacity_factor={_FACTOR.value}; forward+backward; "
        f"backend={jax.default_backend()}; EP mesh data=1 x expert={x_size} "
        f"({jax.device_count()} devices on {os.cpu_count()} cores)")
  rows = []
  for e in map(int, _EXPERTS.value):
    for k in map(int, _TOPK.value):
      inputs = make_inputs(n, d, f, e, k)
      capacity = dispatch.expert_capacity(n, e, k, _FACTOR.value)
      row, outs = {"E": e, "k": k, "C": capacity}, {}
      for path in PATHS:
        sec, compile_s, outs[path] = time_path(path, inputs, capacity, mesh)
        row[path] = {"tokens_per_s": n / sec, "step_s": sec, "compile_s": compile_s,
                     "fwd_MB": exchanged_bytes(path, n, d, e, k, capacity, x_size) / 2**20}
      # Same maths: the capacity paths agree (drops included), the dropless ones too.
      row["max_diff_capacity"] = max(max_diff(outs["einsum"], outs[p]) for p in ("gather", "ep-cap"))
      row["max_diff_dropless"] = max_diff(outs["dropless"], outs["ep-drop"])
      rows.append(row)
      print_row(row)
  ratio = {f"E={r['E']},k={r['k']}": r["dropless"]["tokens_per_s"] / r["einsum"]["tokens_per_s"]
           for r in rows}
  print("dropless / einsum tokens/s:", ", ".join(f"{k_}: {v:.1f}x" for k_, v in ratio.items()))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump({"rows": rows, "dropless_over_einsum": ratio}, fh, indent=2)


def print_row(row):
  if not rows_printed:
    print(f"{'':<18}" + "".join(f"{p:>20}" for p in PATHS) + f"{'rel.diff':>10}")
    print(f"{'':<18}" + "".join(f"{'tok/s':>11}{'MB':>9}" for _ in PATHS))
  rows_printed.append(row)
  print(f"E={row['E']:<3} k={row['k']} C={row['C']:<6}"
        + "".join(f"{row[p]['tokens_per_s']:>11.0f}{row[p]['fwd_MB']:>9.1f}" for p in PATHS)
        + f"{max(row['max_diff_capacity'], row['max_diff_dropless']):>10.0e}")


rows_printed = []


if __name__ == "__main__":
  app.run(main)
