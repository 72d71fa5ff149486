"""Serving throughput: static batching vs continuous batching with paging, and HF.

  python -m experiments.bench_serving [--num_requests=256 --max_batch=32 --page_size=16]
  python -m experiments.bench_serving --num_requests=32 --max_batch=8   # a quick smoke run

A queue of requests with heavy-tailed prompt and output lengths (lognormal, medians
--prompt_median ~100 and --output_median ~150 tokens, sigma --sigma, each capped at
--cap=1024 and prompt + output at the model's 1024 positions; --seed fixes them),
greedy, no EOS (a request generates exactly its output length), on the bench_decode
Llama-like model (random HF Llama, d_model 256, 4 layers, 8/2 heads, FFN 512, vocab
260; experiments/bench_decode.py). Three ways to serve it, in one run:

  (a) static   moelab `generate` over consecutive batches of --max_batch requests,
               contiguous caches, rows padded to the longest prompt and every row run
               to the batch's longest output (what a static batch does)
  (b) paged    moelab continuous batching (decode/engine.py): --max_batch slots over
               one paged cache, finished rows replaced between decode chunks
  (c) HF       transformers `generate` over the same batches as (a), left-padded

Columns: useful tokens/s (each request's own output tokens over the wall time, compile
excluded), the speed-up over (a), and KV memory utilisation: token states held /
KV slots allocated, summed over decode steps (vLLM's measure, Kwon et al. 2023, arXiv
2309.06180 §2.3 and Fig. 2). (a) allocates every row's slots of its current cache
window, (c) HF's DynamicCache every row up to the step's length, (b) the slots of
the pages claimed (the engine counts them on device every step). A token state
counts while its request still needs it: prompt + tokens generated so far, up to
its own output length. `same` compares every request's tokens across (a), (b), (c).

Threads: HF runs with --threads torch threads; moelab with that many host devices
(set before jax starts): (a) splits each batch's rows over them
(decode/data_parallel.py); the engine runs on one device with XLA's intra-op
threads.
"""

import math
import time

from experiments import host_devices

_CORES = host_devices.request("host_devices", host_devices.flag_value("threads", 2))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from decode import data_parallel  # noqa: E402
from decode.config import GenerationConfig  # noqa: E402
from decode.engine import Engine, Request  # noqa: E402
from decode.generate import (decode_fn, pad_prompts, plan_for, row_keys,  # noqa: E402
                             sampling_params)
from experiments.bench_decode import _THREADS, ARCH, hf_model  # noqa: E402
from model.hf_interop import config_from_hf, params_from_hf  # noqa: E402

_N = flags.DEFINE_integer("num_requests", 256, "Requests in the queue.")
_BATCH = flags.DEFINE_integer("max_batch", 32, "Static batch size (a, c) = engine slots (b).")
_PAGE = flags.DEFINE_integer("page_size", 16, "Tokens per page (b).")
_CHUNK = flags.DEFINE_integer("chunk", 32, "Engine decode steps per chunk at most (b).")
_PROMPT_MED = flags.DEFINE_float("prompt_median", 100, "Median prompt length.")
_OUTPUT_MED = flags.DEFINE_float("output_median", 150, "Median output length.")
_SIGMA = flags.DEFINE_float("sigma", 1.0, "Lognormal sigma of both lengths.")
_CAP = flags.DEFINE_integer("cap", 1024, "Cap of each length.")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_SYSTEMS = flags.DEFINE_list("systems", ["static", "paged", "hf"], "Which of (a), (b), (c).")
# --threads (torch threads = moelab host devices) and --host_devices: experiments.bench_decode.


def workload(n, seed, prompt_median, output_median, sigma, cap, max_total):
  """(prompts as lists of ids, output lengths): lognormal lengths, capped."""
  rng = np.random.default_rng(seed)
  p = np.clip(np.round(rng.lognormal(math.log(prompt_median), sigma, n)), 1, cap).astype(int)
  o = np.clip(np.round(rng.lognormal(math.log(output_median), sigma, n)), 1, cap).astype(int)
  p = np.minimum(p, max_total - 1)
  o = np.minimum(o, max_total - p)
  prompts = [rng.integers(3, ARCH["vocab_size"], k).tolist() for k in p]
  return prompts, o.tolist()


def describe(name, x):
  x = np.asarray(x)
  q = np.percentile(x, [10, 50, 90, 99])
  return (f"{name}: mean {x.mean():.0f}, p10 {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
          f"p99 {q[3]:.0f}, max {x.max()}, total {x.sum()}")


def batches(n, size):
  return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def static_utilisation(lens, outs, allocated_at):
  """sum_t token states / sum_t allocated slots over a static batch's decode steps."""
  steps = max(outs)
  stored = sum(sum(p + min(t, o) for p, o in zip(lens, outs)) for t in range(steps))
  return stored, sum(allocated_at(t) for t in range(steps))


def run_static(cfg, params, prompts, outs, size):
  """(a): compiled per batch first; returns (seconds, tokens per request, stored, allocated)."""
  runs = []
  stored = allocated = 0
  for idx in batches(len(prompts), size):
    gen = GenerationConfig(max_new_tokens=max(outs[i] for i in idx))
    prompt, lens = pad_prompts([prompts[i] for i in idx], 0)
    plan = plan_for(cfg, gen, prompt.shape[1], len(idx))
    args = (data_parallel.replicate(params, plan.backend.num_devices), prompt, lens,
            sampling_params(gen, len(idx)), row_keys(gen, len(idx)),
            (np.float32(1.0), np.int32(0)))
    compiled = decode_fn(cfg, plan).lower(*args).compile()
    windows = plan.cache.windows(prompt.shape[1], plan.cache_len)
    longest = int(lens.max())
    window = lambda t: next(w for w in windows if w >= min(longest + t + 1, windows[-1]))
    s, a = static_utilisation(lens.tolist(), [outs[i] for i in idx],
                              lambda t: len(idx) * window(t))
    stored, allocated = stored + s, allocated + a
    runs.append((idx, compiled, args))
  tokens = [None] * len(prompts)
  t = time.perf_counter()
  results = [jax.block_until_ready(c(*a)) for _, c, a in runs]
  seconds = time.perf_counter() - t
  for (idx, _, _), out in zip(runs, results):
    out = np.asarray(out["tokens"])
    for row, i in enumerate(idx):
      tokens[i] = out[row, :outs[i]].tolist()
  return seconds, tokens, stored / allocated


def run_paged(cfg, params, prompts, outs, size, page_size, chunk):
  """(b): the engine, compiled first."""
  reqs = [Request(tuple(p), GenerationConfig(max_new_tokens=o)) for p, o in zip(prompts, outs)]
  engine = Engine(cfg, params, reqs, max_batch=size, page_size=page_size, chunk=chunk)
  compile_s = engine.compile()
  done = engine.run()
  return engine.stats.seconds, [c.tokens for c in done], engine.stats, compile_s


def run_hf(hf, prompts, outs, size):
  """(c): HF generate per batch, left padding, greedy."""
  tokens = [None] * len(prompts)
  stored = allocated = 0
  seconds = 0.0
  with torch.no_grad():
    hf.generate(torch.ones((1, 8), dtype=torch.long), max_new_tokens=4, do_sample=False,
                pad_token_id=0, eos_token_id=None)  # warm-up
    for idx in batches(len(prompts), size):
      width = max(len(prompts[i]) for i in idx)
      ids = torch.zeros((len(idx), width), dtype=torch.long)
      mask = torch.zeros_like(ids)
      for r, i in enumerate(idx):
        ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
        mask[r, width - len(prompts[i]):] = 1
      new = max(outs[i] for i in idx)
      t = time.perf_counter()
      out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0, eos_token_id=None)
      seconds += time.perf_counter() - t
      for r, i in enumerate(idx):
        tokens[i] = out[r, width:width + outs[i]].tolist()
      s, a = static_utilisation([len(prompts[i]) for i in idx], [outs[i] for i in idx],
                                lambda t: len(idx) * (width + t + 1))
      stored, allocated = stored + s, allocated + a
  return seconds, tokens, stored / allocated


def main(argv):
  del argv
  torch.set_num_threads(_THREADS.value)
  hf = hf_model("llama")
  cfg = config_from_hf(hf.config)
  params = params_from_hf(hf.state_dict(), cfg)
  prompts, outs = workload(_N.value, _SEED.value, _PROMPT_MED.value, _OUTPUT_MED.value,
                           _SIGMA.value, _CAP.value, ARCH["max_position_embeddings"])
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.local_device_count()} devices), "
        f"torch {torch.__version__} ({_THREADS.value} threads), transformers "
        f"{transformers.__version__}; {_N.value} requests, batch/slots {_BATCH.value}, "
        f"page size {_PAGE.value}, workload seed {_SEED.value}")
  print(describe("prompt tokens", [len(p) for p in prompts]))
  print(describe("output tokens", outs))
  useful = sum(outs)
  rows, tokens = {}, {}
  if "static" in _SYSTEMS.value:
    s, tokens["static"], util = run_static(cfg, params, prompts, outs, _BATCH.value)
    rows["(a) static, contiguous"] = (useful / s, s, util)
  if "paged" in _SYSTEMS.value:
    s, tokens["paged"], stats, comp = run_paged(cfg, params, prompts, outs, _BATCH.value,
                                                _PAGE.value, _CHUNK.value)
    rows["(b) continuous, paged"] = (useful / s, s, stats.utilisation)
    print(f"# engine: {stats.steps} decode steps in {stats.chunks} chunks, {stats.prefills} "
          f"prefill calls, peak {stats.peak_pages} pages in use; compile {comp:.1f} s")
  if "hf" in _SYSTEMS.value:
    s, tokens["hf"], util = run_hf(hf, prompts, outs, _BATCH.value)
    rows["(c) HF generate, static"] = (useful / s, s, util)
  base = rows.get("(a) static, contiguous", (float("nan"),))[0]
  print(f"{'system':26} {'tok/s':>8} {'seconds':>8} {'vs (a)':>7} {'KV util':>8}")
  for name, (tps, s, util) in rows.items():
    print(f"{name:26} {tps:8.0f} {s:8.1f} {tps / base:7.2f} {100 * util:7.1f}%")
  names = list(tokens)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      same = sum(x == y for x, y in zip(tokens[a], tokens[b]))
      print(f"same tokens {a} vs {b}: {same}/{len(prompts)} requests")


if __name__ == "__main__":
  app.run(main)
