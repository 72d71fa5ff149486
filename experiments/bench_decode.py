"""Decode throughput: Hugging Face transformers (PyTorch CPU) vs moelab (JAX).

  python -m experiments.bench_decode [--new_tokens=256 --beam_tokens=64 --threads=2 --repeats=5]
  python -m experiments.bench_decode --model=smollm2-135m   # a real model instead of the toy
                                     # rows: experiments/bench_pretrained.py

Same architecture and identical weights on both sides: a random HF model
(Llama-like: d_model 256, 4 layers, 8 heads / 2 kv heads, FFN 512, vocab 260;
Mixtral-like: the same with 8 experts, top-2) loaded into moelab with
model/hf_interop.py. Prompt of 64 tokens; no EOS, so every run generates
exactly the requested number of tokens. Rows:

  greedy b=1 / b=8   256 new tokens per row (HF `generate(do_sample=False)`)
  beam 4             64 new tokens, num_beams=4, batch 1 (tokens/s counts
                     generated tokens of the returned sequence)

`--models=mla` (not in the default list) adds a DeepseekV3 with MLA in every
block (`MLA_ARCH`: the Llama-like widths, C = 64, R = 16, dense FFNs) for the
same three rows (moelab decodes absorbed over its latent cache; HF caches
the latents and expands them to per-head K/V at every step), then `mla_rows`:
moelab absorbed against moelab expanded (greedy b1 / b8, timed alternately,
ratio = expanded time / absorbed time, the cache bytes per token of each).

Columns: HF tokens/s, moelab tokens/s (compiled run; compilation timed
separately; each the median of --repeats runs taken alternately, HF then
moelab, after a warm-up of each), their ratio (the median over rounds of
each round's HF time / moelab time, with the lowest and highest round in
"range"), moelab's no-cache recompute baseline (a full forward over the
whole fixed-width sequence for every new token, greedy only) and whether
both produced the same tokens.

Memory columns (greedy rows): MB/step, the bytes a step must read at least
(`decode_bytes`: every non-expert weight, the experts any row picked, the
valid cache entries); GB/s, those bytes over moelab's run time; bound tok/s,
the speed at which reading them once at the machine's streaming bandwidth
(`stream_bandwidth`, printed in the header) would take the whole run. Decode
of these models is a chain of matrix-vector products, so that bound is what
a memory-bound implementation approaches. Working sets that fit the
last-level cache (the Llama-like weights, ~9 MB) can run above it; the
Mixtral-like experts (48 MB) do not fit.

Both sides get the same cores: HF runs with `torch.set_num_threads(threads)`
(intra-op threads); moelab on the JAX CPU backend with `threads` host devices
(set here before jax starts; `--host_devices` overrides), over which a batch's
rows are split (decode/data_parallel.py; the "dev" column). The batch-1 and
beam rows have one prompt, so they run on one device.

On a GPU machine moelab runs on JAX's default backend (the GPU) and
`--hf_device=cuda` puts the HF model there too; run both in float32 without
TF32 (`JAX_DEFAULT_MATMUL_PRECISION=highest`; PyTorch's default) so that the
tokens still match. `JAX_PLATFORMS=cpu` gives the CPU comparison above.
"""

import json
import sys
import time

from experiments import host_devices

_CORES = host_devices.request("host_devices", host_devices.flag_value("threads", 2))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from decode import data_parallel  # noqa: E402
from decode.config import GenerationConfig  # noqa: E402
from decode.generate import (decode_fn, packed_weights, pad_prompts, plan_for, row_keys,  # noqa: E402
                             sampling_params)
from model import kv_accounting  # noqa: E402
from model.hf_interop import config_from_hf, params_from_hf  # noqa: E402
from model.router import Router  # noqa: E402
from model.transformer import Decoder  # noqa: E402
from experiments import bench_pretrained  # noqa: E402  (its flags; the --model rows)

_NEW = flags.DEFINE_integer("new_tokens", 256, "Greedy new tokens per row.")
_BEAM_NEW = flags.DEFINE_integer("beam_tokens", 64, "Beam-search new tokens.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch threads for HF.")
_HF_DEVICE = flags.DEFINE_string("hf_device", "cpu", "torch device of the HF model (cpu, cuda).")
_MODELS = flags.DEFINE_list("models", ["llama", "mixtral"], "Architectures (llama, mixtral, mla).")
_NO_CACHE = flags.DEFINE_bool("no_cache", True, "Run the no-cache recompute baseline.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timed rounds of both sides.")
_ATTENTION = flags.DEFINE_string(
    "attention_impl", "auto", "moelab attention: auto | xla | cpu | pallas (decode/backend.py; "
    "pallas needs --kv_cache=paged).")
_KV_CACHE = flags.DEFINE_string("kv_cache", "contiguous", "moelab cache: contiguous | paged.")
_MOE = flags.DEFINE_string("moe_impl", "auto", "moelab MoE decode steps (decode/backend.py).")
_MATMUL = flags.DEFINE_string("matmul_impl", "auto", "moelab weight products (decode/backend.py).")
_MODEL = flags.DEFINE_string("model", None, "A registered pretrained model (model/pretrained.py) "
                             "instead of the toy rows, e.g. smollm2-135m.")
flags.DEFINE_integer("host_devices", _CORES, "JAX CPU devices (read before jax starts).")

ARCH = dict(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
            eos_token_id=None, pad_token_id=0, bos_token_id=1, initializer_range=0.05)


def impl_flags() -> dict:
  return dict(attention_impl=_ATTENTION.value, moe_impl=_MOE.value, matmul_impl=_MATMUL.value,
              kv_cache=_KV_CACHE.value)


# DeepseekV3 with MLA in every block and dense FFNs: ARCH's widths, a KV latent of
# C = 64 (2 d_h) and a RoPE key of R = 16 (d_h / 2), per-head nope and value widths 32.
MLA_ARCH = dict(ARCH, num_key_value_heads=8, q_lora_rank=None, kv_lora_rank=64,
                qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=4,
                n_routed_experts=1, n_group=1, topk_group=1, num_mtp_layers=0)


def hf_model(kind: str):
  torch.manual_seed(0)
  if kind == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH)).eval()
  if kind == "mla":
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**MLA_ARCH)).eval()
  return transformers.MixtralForCausalLM(transformers.MixtralConfig(
      **ARCH, num_local_experts=8, num_experts_per_tok=2)).eval()


def hf_runner(hf, prompt_BxP, new: int, beams: int):
  """Warms HF up; returns run() -> (seconds, generated tokens)."""
  kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            eos_token_id=None)
  if beams > 1:
    kw.update(num_beams=beams, early_stopping=True)
  ids = torch.tensor(prompt_BxP, device=hf.device)
  with torch.no_grad():
    hf.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up

  def run():
    with torch.no_grad():
      t = time.perf_counter()
      out = hf.generate(ids, **kw)
      if out.is_cuda:
        torch.cuda.synchronize()
      return time.perf_counter() - t, out[:, prompt_BxP.shape[1]:].cpu().numpy()
  return run


def moelab_runner(cfg, params, prompt_BxP, new: int, beams: int, mla_impl: str = "auto"):
  """Compiles (timed) and warms up; the matrix kernel's weights laid out once, as `generate`
  does (decode/generate.py `packed_weights`, timed with the compilation).

  Returns (compile_s, the Backend (decode/backend.py), run() -> (seconds, tokens)).
  """
  gen = GenerationConfig(strategy="beam" if beams > 1 else "greedy", max_new_tokens=new,
                         num_beams=beams, early_stopping=True, mla_impl=mla_impl,
                         **impl_flags())
  prompt, lens = pad_prompts(prompt_BxP.tolist(), 0)
  plan = plan_for(cfg, gen, prompt.shape[1], prompt.shape[0])
  devices = plan.backend.num_devices
  fn = decode_fn(cfg, plan)
  t = time.perf_counter()
  packed = jax.block_until_ready(packed_weights(cfg, params, plan.backend.loop_impl()))
  weights = data_parallel.replicate((params, packed), devices)
  args = (weights[0], jnp.asarray(prompt), jnp.asarray(lens),
          sampling_params(gen, prompt.shape[0]), row_keys(gen, prompt.shape[0]),
          (np.float32(1.0), np.int32(1)), weights[1])
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))  # warm-up (allocations)

  def run():
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t, np.asarray(out["tokens"])[::beams]
  return compile_s, plan.backend, run


def interleaved(runners: dict, repeats: int):
  """Runs the runners in turn, `repeats` rounds.

  Returns {name: (seconds of every round, tokens of the last)}. Alternating
  HF and moelab runs exposes both to the same machine state (the 2-core VM
  this was written on changes speed by up to 2-3x over minutes), so the
  ratio within a round is steadier than either figure (`paired_ratio`).
  """
  times = {name: [] for name in runners}
  tokens = {}
  for _ in range(repeats):
    for name, run in runners.items():
      dt, tokens[name] = run()
      times[name].append(dt)
  return {name: (np.asarray(ts), tokens[name]) for name, ts in times.items()}


def paired_ratio(slow_s, fast_s):
  """(median, min, max) over rounds of slow_s[i] / fast_s[i]: the speed-up."""
  r = np.asarray(slow_s) / np.asarray(fast_s)
  return float(np.median(r)), float(r.min()), float(r.max())


def time_no_cache(cfg, params, prompt_BxP, new: int):
  """Greedy without a cache: full forward over the [B, P + new] buffer per token."""
  model = Decoder(cfg)
  b, p = prompt_BxP.shape

  @jax.jit
  def run(params, prompt):
    buf = jnp.zeros((b, p + new), jnp.int32).at[:, :p].set(prompt)

    def body(i, buf):
      logits, _ = model.apply({"params": params}, buf)
      nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
      return buf.at[:, p + i].set(nxt)
    return jax.lax.fori_loop(0, new, body, buf)[:, p:]

  prompt = jnp.asarray(prompt_BxP)
  jax.block_until_ready(run(params, prompt))
  t = time.perf_counter()
  out = jax.block_until_ready(run(params, prompt))
  return time.perf_counter() - t, np.asarray(out)


def stream_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
  """GB/s of the fastest read this backend does: a 1-row product over a
  `mbytes` MB float32 matrix (far larger than the caches), best of `repeats`.
  Decode steps are matrix-vector products of this kind."""
  w_NxK = jnp.ones((mbytes * 2 ** 20 // 4096, 1024), jnp.float32)
  x_K = jnp.ones((1024,), jnp.float32)
  f = jax.jit(lambda w, x: w @ x)
  jax.block_until_ready(f(w_NxK, x_K))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(w_NxK, x_K))
    best = min(best, time.perf_counter() - t)
  return w_NxK.nbytes / best / 1e9


def decode_bytes(cfg, params, prompt_BxP, tokens_BxN, mla_impl: str = "absorbed") -> float:
  """Bytes a greedy decode of `tokens_BxN` must read at least, all steps summed.

  Every step (prefill included) reads every non-expert weight once (the token
  embedding one row per token; tied embeddings in full, as the unembedding)
  and, of every MoE layer, the experts chosen by any row at that step: their
  union, from the router decisions of a full forward pass over the decoded
  sequences. Each decode step also reads the valid cache entries (K and V of
  every earlier position of every row, and of its own token). Dividing by
  the run time gives the achieved bandwidth, by the machine's
  `stream_bandwidth` a lower bound on the time of any implementation that
  reads this much from memory once; a working set that partly fits the
  last-level cache can beat it.

  prompt_BxP: the prompts (all of width P); tokens_BxN: the N generated ids.
  """
  b, p = prompt_BxP.shape
  n = tokens_BxN.shape[1]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_expert = lambda path: "moe" in str(path) and ("w_in" in str(path) or "w_out" in str(path))
  dense = sum(x.nbytes for path, x in flat if not is_expert(path))
  if not cfg.tie_embeddings:
    dense -= params["embed"].nbytes
  kv_per_pos = kv_accounting.kv_per_token(cfg, mla_impl=mla_impl)[1]  # all layers
  total = n * dense + kv_per_pos * b * sum(p + i for i in range(1, n))
  if cfg.num_moe_layers:
    expert_bytes = sum(x.nbytes for path, x in flat if is_expert(path)) // (
        cfg.num_moe_layers * cfg.num_experts)  # one expert's w_in [D, 2F] + w_out [F, D]
    seq_BxL = np.concatenate([prompt_BxP, tokens_BxN[:, :-1]], axis=1)

    @jax.jit
    def chosen(params, seq_BxL):  # per MoE layer: chosen_BxLxX[b, l, e], expert e picked
      _, state = Decoder(cfg).apply({"params": params}, seq_BxL,
                                    capture_intermediates=lambda m, _: isinstance(m, Router))
      return [jax.nn.one_hot(r.expert_NxA.reshape(b, seq_BxL.shape[1], -1),
                             cfg.num_experts).sum(2) > 0
              for r in jax.tree.leaves(state["intermediates"],
                                       is_leaf=lambda x: hasattr(x, "expert_NxA"))]

    for chosen_BxLxX in map(np.asarray, chosen(params, jnp.asarray(seq_BxL))):
      step_chosen = [chosen_BxLxX[:, :p].any((0, 1))] + list(chosen_BxLxX[:, p:].any(0))
      total += expert_bytes * int(np.sum(step_chosen))
  return float(total)


def mla_rows(cfg, params, rng, stream: float) -> list[dict]:
  """MLA decode with the latent cache ('absorbed') against per-head K/V
  ('expanded'), greedy b1 and b8, timed alternately. ratio = expanded time /
  absorbed time (> 1: absorbed faster); KV B/tok from model/kv_accounting.py."""
  print(f"{'model':8} {'case':10} {'expanded tok/s':>14} {'absorbed tok/s':>14} {'ratio':>6} "
        f"{'range':>9} {'KV B/tok exp':>12} {'KV B/tok abs':>12} {'GB/s exp':>8} "
        f"{'GB/s abs':>8} {'same':>5}")
  rows = []
  for b in (1, 8):
    prompt = rng.integers(3, ARCH["vocab_size"], (b, _PROMPT.value)).astype(np.int32)
    runs = {m: moelab_runner(cfg, params, prompt, _NEW.value, 1, mla_impl=m)
            for m in ("expanded", "absorbed")}
    res = interleaved({m: r[2] for m, r in runs.items()}, _REPEATS.value)
    (e_ts, e_tok), (a_ts, a_tok) = res["expanded"], res["absorbed"]
    ratio, lo, hi = paired_ratio(e_ts, a_ts)
    kv = {m: kv_accounting.kv_per_token(cfg, mla_impl=m)[1] for m in runs}
    gb_s = {m: decode_bytes(cfg, params, prompt, a_tok, m) / float(np.median(ts)) / 1e9
            for m, ts in (("expanded", e_ts), ("absorbed", a_ts))}
    row = dict(model="mla", case=f"abs/exp b{b}", expanded_tok_s=b * _NEW.value / np.median(e_ts),
               absorbed_tok_s=b * _NEW.value / np.median(a_ts), ratio=ratio,
               ratio_range=(lo, hi), kv_bytes_per_token=kv, gb_s=gb_s, stream_gb_s=stream,
               compile_s={m: r[0] for m, r in runs.items()}, repeats=_REPEATS.value,
               same=bool((e_tok == a_tok).all()), backend=jax.default_backend())
    rows.append(row)
    print(f"{'mla':8} {row['case']:10} {row['expanded_tok_s']:14.0f} "
          f"{row['absorbed_tok_s']:14.0f} {ratio:6.2f} {f'{lo:.2f}-{hi:.2f}':>9} "
          f"{kv['expanded']:12d} {kv['absorbed']:12d} {gb_s['expanded']:8.1f} "
          f"{gb_s['absorbed']:8.1f} {str(row['same']):>5}", flush=True)
  return rows


def main(argv):
  del argv
  torch.set_num_threads(_THREADS.value)
  rows = []
  if _MODEL.value:
    new = _NEW.value if _NEW.present else bench_pretrained.DEFAULT_NEW
    repeats = _REPEATS.value if _REPEATS.present else bench_pretrained.DEFAULT_REPEATS
    rows = bench_pretrained.real_model_rows(sys.modules[__name__], _MODEL.value, new,
                                            _PROMPT.value, repeats)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(rows, f, indent=1)
    return
  header = (f"{'model':8} {'case':10} {'HF tok/s':>9} {'moelab tok/s':>12} {'dev':>3} "
            f"{'ratio':>6} {'range':>9} {'no-cache tok/s':>14} {'compile s':>9} {'same':>5} "
            f"{'MB/step':>8} {'GB/s':>5} {'bound tok/s':>11}")
  stream = stream_bandwidth()
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.local_device_count()} devices), "
        f"torch {torch.__version__} ({_HF_DEVICE.value}, {_THREADS.value} threads), "
        f"transformers {transformers.__version__}; streaming read {stream:.1f} GB/s; "
        f"moelab --attention_impl={_ATTENTION.value} --moe_impl={_MOE.value}")
  print(header)
  last_backend = None
  for kind in _MODELS.value:
    hf = hf_model(kind)
    cfg = config_from_hf(hf.config)
    params = params_from_hf(hf.state_dict(), cfg)
    hf = hf.to(_HF_DEVICE.value)
    rng = np.random.default_rng(0)
    for case, b, new, beams in [("greedy b1", 1, _NEW.value, 1), ("greedy b8", 8, _NEW.value, 1),
                                ("beam 4", 1, _BEAM_NEW.value, 4)]:
      prompt = rng.integers(3, ARCH["vocab_size"], (b, _PROMPT.value)).astype(np.int32)
      comp_s, backend, ml_run = moelab_runner(cfg, params, prompt, new, beams)
      devices = backend.num_devices
      res = interleaved({"hf": hf_runner(hf, prompt, new, beams), "moelab": ml_run},
                        _REPEATS.value)
      (hf_ts, hf_tokens), (ml_ts, ml_tokens) = res["hf"], res["moelab"]
      hf_s, ml_s = float(np.median(hf_ts)), float(np.median(ml_ts))
      ratio, lo, hi = paired_ratio(hf_ts, ml_ts)
      nc = float("nan")
      if _NO_CACHE.value and beams == 1:
        nc_s, nc_tokens = time_no_cache(cfg, params, prompt, new)
        nc = b * new / nc_s
        assert (nc_tokens == ml_tokens).mean() > 0.9
      nbytes = decode_bytes(cfg, params, prompt, ml_tokens) if beams == 1 else float("nan")
      row = dict(model=kind, case=case, hf_device=_HF_DEVICE.value,
                 backend=jax.default_backend(), hf_tok_s=b * new / hf_s,
                 moelab_tok_s=b * new / ml_s, devices=devices, moelab_backend=backend.describe(),
                 ratio=ratio, ratio_range=(lo, hi), no_cache_tok_s=nc, compile_s=comp_s,
                 repeats=_REPEATS.value,
                 same=bool((hf_tokens == ml_tokens[:, :hf_tokens.shape[1]]).all()),
                 mb_per_step=nbytes / new / 1e6, gb_s=nbytes / ml_s / 1e9,
                 bound_tok_s=b * new / (nbytes / (stream * 1e9)), stream_gb_s=stream)
      rows.append(row)
      print(f"{kind:8} {case:10} {row['hf_tok_s']:9.0f} {row['moelab_tok_s']:12.0f} {devices:3d} "
            f"{row['ratio']:6.1f} {f'{lo:.1f}-{hi:.1f}':>9} {nc:14.0f} {comp_s:9.2f} "
            f"{str(row['same']):>5} "
            f"{row['mb_per_step']:8.1f} {row['gb_s']:5.1f} {row['bound_tok_s']:11.0f}",
            flush=True)
      if backend.describe() != last_backend:
        last_backend = backend.describe()
        print(f"# {last_backend}", flush=True)
    if kind == "mla":
      rows += mla_rows(cfg, params, rng, stream)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
