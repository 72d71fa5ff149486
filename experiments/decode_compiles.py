"""What one `generate` call compiles: every XLA compilation, its duration, and the decode
program's loops and matrix products (the work an accelerator's compiler autotunes).

  python -m experiments.decode_compiles [--new_tokens=256 --prompt_len=64 --batches=1,8
                                         --growths=2,1 --json=OUT.json]

The model is experiments/bench_decode.py's Llama-like one (d_model 256, 4 blocks, 8 heads /
2 kv heads, SwiGLU 512, vocab 260; random weights, built in moelab directly). For each
batch and `cache_growth` (decode/cache_windows.py; 1 = one cache window) a fresh process
state (the persistent compilation cache off, `decode_fn`'s cache cleared; after one
unreported warm-up call) runs one greedy `generate`; `jax.monitoring` reports each
compilation (tracing, lowering, XLA backend compile). The decode program's StableHLO is counted: while loops, dot_generals and their
distinct operand shapes. docs/performance.md ("Decode compilation") has the findings.
"""

import json
import sys
import time

from experiments import host_devices

host_devices.request("host_devices", 1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from decode import generate as generate_lib  # noqa: E402
from decode.config import GenerationConfig  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Decoder  # noqa: E402

_NEW = flags.DEFINE_integer("new_tokens", 256, "Greedy new tokens per row.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows per generate call.")
_GROWTHS = flags.DEFINE_list("growths", ["2", "1"], "GenerationConfig.cache_growth values.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")
flags.DEFINE_integer("host_devices", 1, "JAX CPU devices (read before jax starts).")

CFG = ModelConfig(vocab_size=260, d_model=256, num_layers=4, num_heads=8, num_kv_heads=2,
                  ffn_dim=512, max_seq_len=1024)
PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}
EVENTS: list = []


def _listen(event, duration, **kw):
  if event in PHASES:
    EVENTS.append((PHASES[event], kw.get("fun_name", "?"), duration))


def program_stats(cfg, gen, prompts) -> dict:
  """Loops and products of the decode program (StableHLO, before XLA's passes)."""
  prompt_BxP, lens_B = generate_lib.pad_prompts(prompts, gen.pad_token_id)
  plan = generate_lib.plan_for(cfg, gen, prompt_BxP.shape[1], len(prompts))
  params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 8), jnp.int32)))["params"]
  beam = (np.float32(1.0), np.int32(1))
  text = generate_lib.decode_fn(cfg, plan).lower(
      params, prompt_BxP, lens_B, generate_lib.sampling_params(gen, len(prompts)),
      generate_lib.row_keys(gen, len(prompts)), beam).as_text()
  dots = [line.split(":")[-1].strip() for line in text.splitlines()
          if "stablehlo.dot_general" in line]
  return {"windows": list(plan.cache.windows(prompt_BxP.shape[1], plan.cache_len)),
          "while_loops": text.count("stablehlo.while"), "dot_generals": len(dots),
          "distinct_dot_shapes": len(set(dots)), "hlo_lines": text.count("\n")}


def measure(params, batch: int, growth: float, new_tokens: int) -> dict:
  """Compilations of one greedy generate call of `batch` rows, nothing cached before."""
  generate_lib.decode_fn.cache_clear()
  jax.clear_caches()
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, 260, (batch, _PROMPT.value)).tolist()
  gen = GenerationConfig(strategy="greedy", max_new_tokens=new_tokens, cache_growth=growth)
  EVENTS.clear()
  t = time.perf_counter()
  generate_lib.generate(CFG, params, prompts, gen)
  wall = time.perf_counter() - t
  compiles = [(name, d) for phase, name, d in EVENTS if phase == "compile"]
  big = max(compiles, key=lambda c: c[1])
  small = [d for n, d in compiles if (n, d) != big]
  phase_s = {p: sum(d for q, n, d in EVENTS if q == p and n in (big[0], big[0][4:-1]))
             for p in ("trace", "lower", "compile")}
  return {"batch": batch, "cache_growth": growth, "backend": jax.default_backend(),
          "generate_s": wall, "xla_compilations": len(compiles),
          "decode_program": big[0], "decode_program_s": phase_s,
          "other_compilations": len(small), "other_compile_s": sum(small),
          **program_stats(CFG, gen, prompts)}


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  jax.monitoring.register_event_duration_secs_listener(_listen)
  params = jax.jit(lambda: Decoder(CFG).init(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32)))()["params"]
  measure(params, 1, 1.0, 4)  # the process's first compilations cost more: not counted
  rows = []
  for b in _BATCHES.value:
    for g in _GROWTHS.value:
      r = measure(params, int(b), float(g), _NEW.value)
      rows.append(r)
      p = r["decode_program_s"]
      print(f"b={r['batch']} growth={r['cache_growth']:g} windows={r['windows']}: "
            f"{r['xla_compilations']} XLA compilations in {r['generate_s']:.2f} s; decode program "
            f"trace {p['trace']:.2f} s, lower {p['lower']:.2f} s, compile {p['compile']:.2f} s; "
            f"{r['other_compilations']} others {r['other_compile_s']:.2f} s; "
            f"{r['while_loops']} while loops, {r['dot_generals']} dot_generals "
            f"({r['distinct_dot_shapes']} distinct shapes)", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
