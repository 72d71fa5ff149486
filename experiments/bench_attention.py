"""Paged decode attention bandwidth: our Pallas kernels vs their references vs jax's.

  python -m experiments.bench_attention [--kinds=gqa,mla --contexts=1024,4096,16384,32768
      --batches=1,8,64 --dtype=bfloat16 --peak_tbps=4.8 --json=PATH]

For every kind x context x batch it builds a paged cache (every row `context`
tokens long, pages shuffled over the cache) and times, side by side:

  ours       kernels.paged_attention / kernels.mla_attention on this backend
             (impl "gpu" = Pallas Triton, "tpu" = Pallas Mosaic TPU)
  reference  the plain-XLA reference of the same module (gathers the pages)
  jax        jax's shipped paged kernel on the same shapes: GQA only,
             jax.experimental.pallas.ops.gpu.paged_attention (GPU) or
             ops.tpu.paged_attention (TPU); jax ships no MLA kernel ("-")

Shapes: GQA Llama-3-8B-like (H 32, K 8, E 128, page size 16); MLA DeepSeek-V2's
absorbed form (C 512, R 64, 16 heads (128 over tensor parallelism 8), page
size 64, scale 1 / sqrt(128 + 64)). GB/s = bytes of valid K/V (GQA) or latent
(MLA) rows read / time; "%peak" against the device's HBM bandwidth (PEAK_TBPS,
from jax.devices()[0].device_kind, or --peak_tbps); "x ref" and "x jax" are
time ratios (> 1: ours faster). A call's time is the best of --rounds runs of
--iters calls inside one jit (the query nudged by the step, so XLA cannot hoist
the call); "err" is max |ours - reference| (their outputs, means over the timed
calls). Targets reported (H100 / H200): >= 70% of peak at context >= 4k, and
faster than jax's kernel.

On a CPU backend there is no kernel to time: it runs a tiny interpret-mode
correctness pass of both kernels against the references and says so.
`--kernel=gpu --interpret` (or tpu) runs the timed path with interpret-mode
kernels instead: a dry run of this script on a CPU, its figures meaningless.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels import mla_attention, paged_attention

_KINDS = flags.DEFINE_list("kinds", ["gqa", "mla"], "gqa and/or mla.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "16384", "32768"], "Tokens per row.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Rows.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Cache and query dtype.")
_HEADS = flags.DEFINE_integer("heads", 32, "GQA query heads H.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "GQA kv heads K.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "GQA head width E.")
_PAGE = flags.DEFINE_integer("page_size", 16, "GQA page size S.")
_MLA_HEADS = flags.DEFINE_integer("mla_heads", 16, "MLA query heads H.")
_LATENT = flags.DEFINE_integer("latent", 512, "MLA latent width C.")
_ROPE = flags.DEFINE_integer("rope", 64, "MLA rope width R.")
_MLA_PAGE = flags.DEFINE_integer("mla_page_size", 64, "MLA page size S.")
_PPB = flags.DEFINE_integer("pages_per_block", None, "Our pages_per_block (None: default).")
_SPLITS = flags.DEFINE_integer("num_splits", None, "Our kernels' num_splits (default: theirs).")
_IMPLS = flags.DEFINE_list("impls", ["ours", "reference", "jax"], "Columns to time.")
_KERNEL = flags.DEFINE_enum("kernel", "auto", ["auto", "gpu", "tpu"],
                            "Our kernel (auto: the backend's; on CPU the correctness pass).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Time interpret-mode kernels (a dry run of "
                               "this script on a CPU: its figures mean nothing).")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timed jit.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed runs; the fastest counts.")
_PEAK = flags.DEFINE_float("peak_tbps", None, "HBM bandwidth in TB/s (default: PEAK_TBPS).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

# Peak HBM bandwidth, TB/s, by a substring of device_kind (first match wins).
PEAK_TBPS = (("H200", 4.8), ("H100", 3.35), ("A100-SXM4-80GB", 2.0), ("A100 80GB", 2.0),
             ("TPU v4", 1.2), ("TPU v5 lite", 0.82), ("TPU v5e", 0.82), ("TPU v5p", 2.76),
             ("TPU v5", 2.76))
TARGET_FRACTION, TARGET_CONTEXT = 0.7, 4096


def peak_tbps(kind: str):
  """The --peak_tbps flag, else the PEAK_TBPS entry matching this device kind, else None."""
  if _PEAK.value:
    return _PEAK.value
  if "H100" in kind and "PCIe" in kind:
    return None  # 2.0 TB/s, a different part from the SXM H100 in the table
  return next((tbps for key, tbps in PEAK_TBPS if key in kind), None)


def make_problem(kind, batch, context, dtype, seed=0):
  """(args, kwargs, valid bytes read) of one call; pages shuffled over the cache."""
  s = _PAGE.value if kind == "gqa" else _MLA_PAGE.value
  m = -(-context // s)
  keys = jax.random.split(jax.random.key(seed), 4)
  tables = jax.random.permutation(keys[0], batch * m).reshape(batch, m).astype(jnp.int32)
  lengths = jnp.full((batch,), context, jnp.int32)
  itemsize = jnp.dtype(dtype).itemsize
  if kind == "gqa":
    h, k, e = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    q = jax.random.normal(keys[1], (batch, h, e), dtype)
    k_pages = jax.random.normal(keys[2], (k, batch * m, s, e), dtype)
    v_pages = jax.random.normal(keys[3], (k, batch * m, s, e), dtype)
    return (q, k_pages, v_pages, tables, lengths), {}, 2 * batch * context * k * e * itemsize
  h, c, r = _MLA_HEADS.value, _LATENT.value, _ROPE.value
  q_latent = jax.random.normal(keys[1], (batch, h, c), dtype)
  q_rope = jax.random.normal(keys[2], (batch, h, r), dtype)
  kv_pages = jax.random.normal(keys[3], (batch * m, s, c + r), dtype)
  return ((q_latent, q_rope, kv_pages, tables, lengths), {"scale": (128 + 64) ** -0.5},
          batch * context * (c + r) * itemsize)


def column_fn(kind, column, kernel_impl):
  """f(*args, **kw) -> output for one column, or None where it does not exist."""
  tuning = {k: v for k, v in (("pages_per_block", _PPB.value), ("num_splits", _SPLITS.value))
            if v is not None}
  module = paged_attention.paged_attention if kind == "gqa" else mla_attention.mla_decode_attention
  if column == "ours":
    return lambda *a, **kw: module(*a, impl=kernel_impl, interpret=_INTERPRET.value, **kw, **tuning)
  if column == "reference":
    return lambda *a, **kw: module(*a, impl="reference", **kw)
  if kind == "mla" or (kernel_impl == "tpu" and _INTERPRET.value):
    return None
  if kernel_impl == "gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_gpu
    return lambda q, kp, vp, t, l: jax_gpu.paged_attention(
        q, kp, vp, t, l, k_splits=max(d for d in (16, 8, 4, 2, 1) if t.shape[1] % d == 0),
        interpret=_INTERPRET.value)
  from jax.experimental.pallas.ops.tpu import paged_attention as jax_tpu
  return lambda q, kp, vp, t, l: jax_tpu.paged_attention(
      q, kp, vp, l, t, pages_per_compute_block=max(
          d for d in (8, 4, 2, 1) if t.shape[1] % d == 0))


def seconds_per_call(f, args, kw):
  """(seconds, mean output): best of --rounds runs of --iters calls in one jit, each
  call's query nudged by the loop step (so that the call is not loop-invariant)."""
  def many(*args):
    def body(i, acc):
      q = args[0] * (1 + i.astype(args[0].dtype) * 1e-30)
      return acc + f(q, *args[1:], **kw).astype(jnp.float32)
    out = jax.eval_shape(lambda: f(*args, **kw))
    return jax.lax.fori_loop(0, _ITERS.value, body, jnp.zeros(out.shape)) / _ITERS.value
  compiled = jax.jit(many).lower(*args).compile()
  out = np.asarray(compiled(*args))
  best = float("inf")
  for _ in range(_ROUNDS.value):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, (time.perf_counter() - t) / _ITERS.value)
  return best, out


def bench_row(kind, batch, context, dtype, kernel_impl, peak):
  args, kw, nbytes = make_problem(kind, batch, context, dtype)
  row = dict(kind=kind, batch=batch, context=context, dtype=dtype, bytes=nbytes)
  outs = {}
  for column in _IMPLS.value:
    f = column_fn(kind, column, kernel_impl)
    if f is None:
      continue
    try:
      sec, outs[column] = seconds_per_call(f, args, kw)
    except Exception as e:  # e.g. out of memory for the reference's gathered copy  # noqa: BLE001
      row[column] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
      continue
    row[column] = dict(us=sec * 1e6, gbps=nbytes / sec / 1e9,
                       peak_fraction=nbytes / sec / (peak * 1e12) if peak else None)
  if "ours" in outs and "reference" in outs:
    row["err"] = float(np.max(np.abs(outs["ours"] - outs["reference"])))
  us = {c: row[c]["us"] for c in ("ours", "reference", "jax") if "us" in row.get(c, {})}
  for other in ("reference", "jax"):
    if "ours" in us and other in us:
      row[f"x_{other}"] = us[other] / us["ours"]
  if "ours" in us and context >= TARGET_CONTEXT:
    frac = row["ours"]["peak_fraction"]
    row["meets_bandwidth_target"] = None if frac is None else frac >= TARGET_FRACTION
    row["beats_jax"] = row["x_jax"] > 1 if "x_jax" in row else None
  return row


def print_row(row):
  cell = lambda c: (f"{row[c]['us']:>9.1f}{row[c]['gbps']:>8.0f}" if "us" in row.get(c, {}) else
                    f"{'oom' if 'error' in row.get(c, {}) else '-':>17}")
  frac = row.get("ours", {}).get("peak_fraction")
  ratio = lambda k: f"{row[k]:>7.2f}" if k in row else f"{'-':>7}"
  print(f"{row['kind']:>4} {row['context']:>6} {row['batch']:>4}" + cell("ours")
        + (f"{100 * frac:>7.1f}" if frac is not None else f"{'-':>7}") + cell("reference")
        + cell("jax") + ratio("x_reference") + ratio("x_jax")
        + (f"{row['err']:>9.1e}" if "err" in row else f"{'-':>9}"), flush=True)


def cpu_check():
  """Tiny interpret-mode pass: both kernels against the references, on the CPU."""
  print("backend cpu: no bandwidth figure is meaningful here (the kernels can only run "
        "interpreted); correctness pass, max |kernel - reference|:")
  results = []
  for kind in _KINDS.value:
    s = 16
    tables = jnp.asarray(np.random.default_rng(0).permutation(12)[:8].reshape(2, 4), jnp.int32)
    lengths = jnp.array([37, 64], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    if kind == "gqa":
      args = (jax.random.normal(keys[0], (2, 8, 64)), jax.random.normal(keys[1], (2, 12, s, 64)),
              jax.random.normal(keys[2], (2, 12, s, 64)), tables, lengths)
      f, kw = paged_attention.paged_attention, {}
    else:
      args = (jax.random.normal(keys[0], (2, 4, 64)), jax.random.normal(keys[1], (2, 4, 16)),
              jax.random.normal(keys[2], (12, s, 80)), tables, lengths)
      f, kw = mla_attention.mla_decode_attention, {"scale": 0.125}
    ref = np.asarray(f(*args, impl="reference", **kw))
    for impl in ("gpu", "tpu"):
      err = float(np.max(np.abs(np.asarray(f(*args, impl=impl, interpret=True, **kw)) - ref)))
      results.append(dict(kind=kind, impl=impl, interpret=True, err=err, ok=err < 1e-5))
      print(f"  {kind} {impl:<3} (interpret) {err:.1e} {'ok' if err < 1e-5 else 'MISMATCH'}")
  return results


def main(argv):
  del argv
  backend = jax.default_backend()
  kernel_impl = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(backend)
  kernel_impl = kernel_impl if _KERNEL.value == "auto" else _KERNEL.value
  device = jax.devices()[0].device_kind
  print(f"jax {jax.__version__}, backend {backend}, device {device}, kernel {kernel_impl}"
        + (" (interpret mode: the figures below mean nothing)" if _INTERPRET.value else ""))
  if kernel_impl is None:
    out = dict(backend=backend, device=device, cpu_check=cpu_check())
    if _JSON.value:
      with open(_JSON.value, "w") as fh:
        json.dump(out, fh, indent=2)
    if not all(r["ok"] for r in out["cpu_check"]):
      raise SystemExit("kernel and reference differ")
    return
  peak = peak_tbps(device)
  print(f"peak HBM bandwidth: {f'{peak} TB/s' if peak else 'unknown (set --peak_tbps)'}; "
        f"{_DTYPE.value}; time per call: best of {_ROUNDS.value} x {_ITERS.value} calls")
  print(f"{'kind':>4} {'ctx':>6} {'B':>4}{'ours us':>9}{'GB/s':>8}{'%peak':>7}{'ref us':>9}"
        f"{'GB/s':>8}{'jax us':>9}{'GB/s':>8}{'x ref':>7}{'x jax':>7}{'err':>9}")
  rows = []
  for kind in _KINDS.value:
    for context in map(int, _CONTEXTS.value):
      for batch in map(int, _BATCHES.value):
        rows.append(bench_row(kind, batch, context, jnp.dtype(_DTYPE.value).name, kernel_impl,
                              peak))
        print_row(rows[-1])
  judged = [r for r in rows if "meets_bandwidth_target" in r]
  for key, what in (("meets_bandwidth_target", f">= {TARGET_FRACTION:.0%} of peak"),
                    ("beats_jax", "faster than jax's kernel")):
    known = [r for r in judged if r[key] is not None]
    print(f"target {what} at context >= {TARGET_CONTEXT}: {sum(r[key] for r in known)} of "
          f"{len(known)} rows" + ("" if len(known) == len(judged) else
                                  f" ({len(judged) - len(known)} without a figure)"))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump(dict(backend=backend, device=device, peak_tbps=peak, rows=rows), fh, indent=2)


if __name__ == "__main__":
  app.run(main)
