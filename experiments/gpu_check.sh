#!/usr/bin/env bash
# Checks for a GPU machine, in named sections, each with its own timeout and a
# PASS / FAIL / TIMEOUT line; one summary at the end (exit 1 if any section failed).
# The whole run takes under 8 minutes on one H100 / H200.
#
#   bash experiments/gpu_check.sh [--dry-run] [SECTION ...]
#
# --dry-run (or GPU_CHECK_DRY=1) runs every section in a CPU-sized form, so the
# script itself can be tested on a machine without a GPU. Logs and JSON land in
# $GPU_CHECK_OUT (default: a new /tmp/gpu_check.* folder).
#
# Adding a section: define `section_NAME` (a function; $DRY is 1 in a dry run,
# $OUT the output folder) and append "NAME TIMEOUT_SECONDS" to SECTIONS.
set -u
cd "$(dirname "$0")/.."

DRY=${GPU_CHECK_DRY:-0}
ONLY=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) ONLY+=("$arg") ;;
  esac
done
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
export DRY OUT
PY=${PYTHON:-python}
export PY

# Kernel tests on the real backend: the Pallas kernel of this machine compiled
# (MOELAB_KERNEL_TESTS_ON_DEVICE=1, tests/kernels/conftest.py), the other
# interpreted, plus the lowering and validation tests. Dry: the fast subset, on CPU.
section_kernel_tests() {
  local files="tests/kernels/test_paged_attention.py tests/kernels/test_mla_attention.py"
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m pytest $files -q -k "lowers or bad_input or float64" --durations=3
  else
    MOELAB_KERNEL_TESTS_ON_DEVICE=1 $PY -m pytest $files -q --durations=5
  fi
}

# bench_attention at a few shapes: ours vs the references vs jax's paged kernel.
# Dry: the CPU correctness pass and the timed path in interpret mode at toy shapes.
section_bench_attention() {
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m experiments.bench_attention --json="$OUT/bench_attention_cpu.json" &&
    JAX_PLATFORMS=cpu $PY -m experiments.bench_attention --kernel=gpu --interpret --contexts=100 \
      --batches=2 --heads=4 --kv_heads=2 --head_dim=64 --mla_heads=4 --latent=64 --rope=16 \
      --mla_page_size=16 --iters=2 --rounds=1 --json="$OUT/bench_attention.json"
  else
    $PY -m experiments.bench_attention --contexts=1024,4096,32768 --batches=1,8,64 --iters=10 \
      --json="$OUT/bench_attention.json"
  fi
}

# Decode parity with attention_impl=pallas: generate with the Pallas kernels equals
# attention_impl=xla token for token (GQA and MLA; tests/decode/test_pallas_decode.py,
# the kernel of this machine compiled: MOELAB_KERNEL_TESTS_ON_DEVICE=1 makes the file
# refuse a CPU backend and check nothing ran interpreted), and the paged cache's own
# parity tests; matmuls in full float32 (no TF32) on both sides. Dry: both files on
# CPU, the Triton kernel in Pallas interpret mode.
section_decode_parity() {
  local files="tests/decode/test_pallas_decode.py tests/decode/test_paged_cache.py"
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m pytest -p no:xdist $files -q --durations=5
  else
    MOELAB_KERNEL_TESTS_ON_DEVICE=1 JAX_DEFAULT_MATMUL_PRECISION=highest \
      $PY -m pytest -p no:xdist $files -q --durations=5
  fi
}

# --- Training at accelerator scale (issue 29) ---------------------------------------
# train_moe_gpu, train_dense_gpu, bench_decode_gpu, decode_compile_gpu, tests_gpu: their
# limits add up to 8 minutes of GPU time (bash experiments/gpu_check.sh SECTION... runs some).
# One training run of `config` for the train_*_gpu sections into $OUT/work_NAME (fresh),
# its summary JSON (experiments/train.py) in $OUT/NAME.summary.json. Real: 50 steps, log
# every 10 (the first step compiles; the other windows are timed), no eval or checkpoint
# until the end. Dry: 6 steps of the same config at a CPU size (d_model 64, 2 blocks,
# 4 rows of 64 tokens).
train_gpu_run() {  # NAME CONFIG [EXTRA FLAGS...]
  local name=$1 config=$2; shift 2
  local work="$OUT/work_$name"
  rm -rf "$work"
  local flags=(--config="$config" --workdir="$work" --compilation_cache="$OUT/jax_cache"
               --config.train.eval_every=1000 --config.checkpoint.every=1000
               --config.checkpoint.keep=1 --config.train.eval_batches=2)
  if [ "$DRY" = 1 ]; then
    flags+=(--config.train.steps=6 --config.train.log_every=2 --config.optimizer.warmup_steps=2
            --config.model.d_model=64 --config.model.num_layers=2 --config.model.num_heads=4
            --config.model.num_kv_heads=2 --config.model.ffn_dim=128
            --config.model.moe_ffn_dim=64 --config.data.seq_len=64 --config.data.batch_size=4)
    JAX_PLATFORMS=cpu $PY -m experiments.train "${flags[@]}" "$@" > "$OUT/$name.summary.json"
  else
    flags+=(--config.train.steps=50 --config.train.log_every=10
            --config.optimizer.warmup_steps=10)
    $PY -m experiments.train "${flags[@]}" "$@" > "$OUT/$name.summary.json"
  fi
}
export -f train_gpu_run

# configs/moe_gpu.py (bf16, dropless top-2 of 8 experts, sequence 1,024), without and
# with remat=block: steps/s, tokens/s and MFU of each run's metrics.jsonl
# (experiments/train_report.py) in $OUT/train_moe_gpu.json.
section_train_moe_gpu() {
  train_gpu_run moe_gpu configs/moe_gpu.py &&
  train_gpu_run moe_gpu_remat configs/moe_gpu.py --config.train.remat=block &&
  $PY -m experiments.train_report --json="$OUT/train_moe_gpu.json" \
    "$OUT/work_moe_gpu" "$OUT/work_moe_gpu_remat"
}

# configs/dense_gpu.py, moe_gpu's dense counterpart at the same active FLOPs per token.
section_train_dense_gpu() {
  train_gpu_run dense_gpu configs/dense_gpu.py &&
  $PY -m experiments.train_report --json="$OUT/train_dense_gpu.json" "$OUT/work_dense_gpu"
}

# bench_decode with the HF model on the GPU too (--hf_device=cuda), float32 without TF32
# on both sides so the tokens match; the Llama-like rows at 64 new tokens (one cache
# window: the earlier run spent its time limit compiling). Dry: both on the CPU, toy lengths.
section_bench_decode_gpu() {
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m experiments.bench_decode --hf_device=cpu --models=llama \
      --new_tokens=8 --beam_tokens=4 --prompt_len=8 --repeats=1 --nono_cache \
      --json="$OUT/bench_decode_gpu.json"
  else
    JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m experiments.bench_decode --hf_device=cuda \
      --models=llama --new_tokens=64 --beam_tokens=16 --repeats=3 --nono_cache \
      --json="$OUT/bench_decode_gpu.json"
  fi
}

# What one generate call compiles on the GPU (experiments/decode_compiles.py: every XLA
# compilation and its time, the decode program's loops and products), greedy batch 1:
# default flags with growing cache windows and with one window, then XLA's autotuning off
# (--xla_gpu_autotune_level=0): where the 32-64 s GPU compile of bench_decode goes
# (docs/performance.md, "Decode compilation"). Dry: the same at toy lengths on the CPU.
section_decode_compile_gpu() {
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m experiments.decode_compiles --new_tokens=16 --prompt_len=8 \
      --batches=1 --growths=2,1 --json="$OUT/decode_compile_gpu.json"
  else
    $PY -m experiments.decode_compiles --batches=1 --growths=2,1 \
      --json="$OUT/decode_compile_gpu.json" &&
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $PY -m experiments.decode_compiles \
      --batches=1 --growths=2 --json="$OUT/decode_compile_gpu_noautotune.json"
  fi
}

# The accelerator-relevant tests on the GPU: bf16 mixed precision, remat (the compiled
# temporaries none > block, measured by the GPU's own scheduler), gradient accumulation,
# FLOPs/MFU, and the grouped matmul (ragged_dot) of dropless MoE; float32 references in
# full float32 (no TF32). Dry: the parts that compile nothing, on CPU.
section_tests_gpu() {
  local files="tests/train/test_mixed_precision.py tests/train/test_remat.py
               tests/train/test_grad_accum.py tests/train/test_flops.py
               tests/kernels/test_grouped_matmul.py"
  if [ "$DRY" = 1 ]; then
    JAX_PLATFORMS=cpu $PY -m pytest -p no:xdist $files -q --durations=3 \
      -k "float32_statistics or are_float32 or validated or by_hand or gpu_configs or keeps_bias"
  else
    JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -p no:xdist $files -q --durations=10
  fi
}
# -------------------------------------------------------------------------------------

# Timeouts sum to 470 s, inside the 8-minute budget of a lent GPU session; they
# are estimates (no GPU run yet): a TIMEOUT line says which one to move.
SECTIONS=(
  "kernel_tests 80"
  "bench_attention 70"
  "decode_parity 50"
  "train_moe_gpu 100"
  "train_dense_gpu 45"
  "bench_decode_gpu 55"
  "decode_compile_gpu 30"
  "tests_gpu 40"
)

echo "gpu_check: $(date -u +%FT%TZ), dry=$DRY, out=$OUT, git $(git rev-parse --short HEAD 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" 2>&1 | tail -1

RESULTS=()
FAILED=0
for entry in "${SECTIONS[@]}"; do
  read -r name limit <<<"$entry"
  [ "$DRY" = 1 ] && limit=$((limit * 6))  # CPU dry runs interpret the kernels: slower
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " == *" $name "* ]]; then continue; fi
  echo
  echo "=== $name (timeout ${limit}s) ==="
  export -f "section_$name"
  start=$SECONDS
  timeout --kill-after=15 "$limit" bash -c "set -o pipefail; section_$name 2>&1 | tee '$OUT/$name.log'"
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  echo "--- $name: $status in ${took}s (log: $OUT/$name.log)"
  RESULTS+=("$(printf '%-20s %-16s %5ss' "$name" "$status" "$took")")
done

echo
echo "=== gpu_check summary (dry=$DRY) ==="
printf '%s\n' "${RESULTS[@]}"
if [ "$FAILED" = 0 ]; then echo "ALL PASSED"; else echo "SOME FAILED"; fi
exit "$FAILED"
