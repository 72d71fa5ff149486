"""Decode throughput on a real pretrained model: HF transformers vs moelab, against the memory bound.

    python -m experiments.bench_decode --model=smollm2-135m [--new_tokens=96 --repeats=3
        --batches=1,8 --dtypes=float32,bfloat16 --matmul_impl=auto --json=FILE]

`real_model_rows` (called by experiments/bench_decode.py, passing itself, when
`--model` is given) loads the registered GGUF checkpoint (model/pretrained.py) into HF
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, dequantized to
float32) and maps HF's state dict into moelab (model/hf_interop.py), so both
sides run identical weights. For every dtype and batch: a random prompt of
`--prompt_len` ids per row, greedy `--new_tokens` new tokens, no EOS, timed
alternately (HF, moelab, ...) after a warm-up of each, as the toy rows of
bench_decode. bfloat16 is HF `.to(torch.bfloat16)` against moelab's
`cfg.replace(dtype='bfloat16')` with `cast_weights`: weights and
activations in bfloat16 on both sides.

Columns: tok/s of each (median of the rounds), ratio (median of the rounds'
HF time / moelab time, with the range), dev (moelab's devices), MB/step
(`decode_bytes`: every weight once, the tied embedding as the unembedding,
the valid cache entries), GB/s (those bytes over moelab's time), bound tok/s
(reading them once at the streaming bandwidth, `stream_bandwidth`, measured
in every round beside both sides and printed as "stream", the median over
the rounds, as the tok/s are) and "% of bound" (moelab tok/s over it). Both sides' runs include the prompt's prefill, which is
compute-bound, not a weight read: "prefill s" times moelab's prefill and
first token alone (a 1-token run, compiled separately), and "decode tok/s" /
"decode %" are the other new tokens over the rest of the run, against the
same bound. "same" is True when every row's tokens equal HF's, else the
shortest common prefix over the rows (bfloat16 rounding differs between
the two: the sums run in different orders).

Last, for every batch run in both dtypes, "bf16 / f32": moelab's float32 time
over its bfloat16 time, the two compiled runs alternated for the same rounds
(median and range over the rounds). The rows above are measured minutes apart,
and this machine's speed moves by up to 1.5x between them, so only this
alternation compares the two dtypes.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import torch
import transformers
from absl import flags

from model.hf_interop import config_from_hf, params_from_hf
from model.params import cast_weights
from model.pretrained import resolve

_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "--model: weight dtypes.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "--model: batch sizes (rows).")
DEFAULT_NEW = 96  # --new_tokens when not given: a real model's step is ~100x the toy's
DEFAULT_REPEATS = 3  # --repeats when not given (HF takes ~10-30 s a round here)


def load_hf(name: str):
  """The registered GGUF checkpoint `name` as an HF model in float32 (eval mode)."""
  path = resolve(name)
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def common_prefix(a_BxN, b_BxN) -> int:
  """Shortest (over rows) number of leading tokens that agree."""
  diff = a_BxN != b_BxN
  return int(np.where(diff.any(1), diff.argmax(1), a_BxN.shape[1]).min())


def real_model_rows(bench, name: str, new: int, prompt_len: int, repeats: int) -> list[dict]:
  """Prints and returns the rows described in the module docstring.

  bench: the experiments/bench_decode module that runs this (its runners,
  `interleaved`, `paired_ratio`, `decode_bytes`, `stream_bandwidth`).
  """
  hf32 = load_hf(name)
  cfg32 = config_from_hf(hf32.config)
  params32 = params_from_hf(hf32.state_dict(), cfg32)
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.local_device_count()} devices), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; moelab {bench.impl_flags()}")
  print(f"{name}: {cfg32.num_layers} layers, d {cfg32.d_model}, {cfg32.num_heads}/"
        f"{cfg32.num_kv_heads} heads, FFN {cfg32.ffn_dim}, vocab {cfg32.vocab_size}, "
        f"tied {cfg32.tie_embeddings}; prompt {prompt_len}, {new} new tokens, {repeats} rounds")
  print(f"{'dtype':9} {'batch':>5} {'HF tok/s':>9} {'moelab tok/s':>12} {'ratio':>6} "
        f"{'range':>9} {'dev':>3} {'MB/step':>8} {'GB/s':>5} {'stream':>6} {'bound tok/s':>11} "
        f"{'% bound':>7} {'prefill s':>9} {'decode tok/s':>12} {'decode %':>8} {'compile s':>9} "
        f"{'same':>5}")
  rows, rng, last_backend, runs = [], np.random.default_rng(0), None, {}
  for dtype in _DTYPES.value:
    hf = hf32 if dtype == "float32" else copy.deepcopy(hf32).to(getattr(torch, dtype))
    cfg = cfg32.replace(dtype=dtype)
    params = params32 if dtype == "float32" else cast_weights(params32, dtype)
    for b in map(int, _BATCHES.value):
      prompt = rng.integers(3, cfg.vocab_size, (b, prompt_len)).astype(np.int32)
      comp_s, backend, ml_run = bench.moelab_runner(cfg, params, prompt, new, 1)
      runs[dtype, b] = ml_run
      # The stream is read in every round too, next to both sides (its "time" is GB/s).
      res = bench.interleaved({"hf": bench.hf_runner(hf, prompt, new, 1), "moelab": ml_run,
                               "stream": lambda: (bench.stream_bandwidth(), None)}, repeats)
      (hf_ts, hf_tok), (ml_ts, ml_tok) = res["hf"], res["moelab"]
      streams = res["stream"][0]
      stream = float(np.median(streams))
      _, _, first_run = bench.moelab_runner(cfg, params, prompt, 1, 1)
      prefill_s = float(np.median([first_run()[0] for _ in range(repeats)]))
      ratio, lo, hi = bench.paired_ratio(hf_ts, ml_ts)
      nbytes = bench.decode_bytes(cfg, params, prompt, ml_tok)
      ml_s = float(np.median(ml_ts))
      prefix = common_prefix(hf_tok, ml_tok[:, :hf_tok.shape[1]])
      row = dict(model=name, dtype=dtype, batch=b, hf_tok_s=b * new / float(np.median(hf_ts)),
                 moelab_tok_s=b * new / ml_s, ratio=ratio, ratio_range=(lo, hi),
                 devices=backend.num_devices, moelab_backend=backend.describe(),
                 mb_per_step=nbytes / new / 1e6, gb_s=nbytes / ml_s / 1e9, stream_gb_s=stream,
                 stream_gb_s_rounds=streams.tolist(),
                 bound_tok_s=b * new * stream * 1e9 / nbytes, compile_s=comp_s,
                 same=prefix == new, same_prefix=prefix, new_tokens=new, repeats=repeats,
                 hf_s=hf_ts.tolist(), moelab_s=ml_ts.tolist())
      row["pct_of_bound"] = 100 * row["moelab_tok_s"] / row["bound_tok_s"]
      row["prefill_s"] = prefill_s
      row["decode_tok_s"] = b * (new - 1) / max(ml_s - prefill_s, 1e-9)
      row["decode_pct_of_bound"] = 100 * row["decode_tok_s"] / row["bound_tok_s"]
      rows.append(row)
      same = "True" if row["same"] else f"{prefix}/{new}"
      print(f"{dtype:9} {b:5d} {row['hf_tok_s']:9.1f} {row['moelab_tok_s']:12.1f} {ratio:6.2f} "
            f"{f'{lo:.1f}-{hi:.1f}':>9} {backend.num_devices:3d} {row['mb_per_step']:8.1f} "
            f"{row['gb_s']:5.1f} {stream:6.1f} {row['bound_tok_s']:11.1f} "
            f"{row['pct_of_bound']:6.0f}% {prefill_s:9.2f} {row['decode_tok_s']:12.1f} "
            f"{row['decode_pct_of_bound']:7.0f}% {comp_s:9.2f} {same:>5}", flush=True)
      if backend.describe() != last_backend:
        last_backend = backend.describe()
        print(f"# {last_backend}", flush=True)
  for b in map(int, _BATCHES.value):
    if ("float32", b) in runs and ("bfloat16", b) in runs:
      res = bench.interleaved({d: runs[d, b] for d in ("float32", "bfloat16")}, repeats)
      ratio, lo, hi = bench.paired_ratio(res["float32"][0], res["bfloat16"][0])
      rows.append(dict(model=name, case=f"bf16/f32 b{b}", batch=b, dtype_ratio=ratio,
                       dtype_ratio_range=(lo, hi), repeats=repeats,
                       float32_s=res["float32"][0].tolist(),
                       bfloat16_s=res["bfloat16"][0].tolist()))
      print(f"bf16 / f32 batch {b}: {ratio:.2f} ({lo:.2f}-{hi:.2f}), moelab float32 and "
            f"bfloat16 alternated ({b * new / np.median(res['float32'][0]):.1f} and "
            f"{b * new / np.median(res['bfloat16'][0]):.1f} tok/s)", flush=True)
  return rows

