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

SECTIONS=(
  "kernel_tests 300"
  "bench_attention 240"
)

echo "gpu_check: $(date -u +%FT%TZ), dry=$DRY, out=$OUT, git $(git rev-parse --short HEAD 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" 2>&1 | tail -1

RESULTS=()
FAILED=0
for entry in "${SECTIONS[@]}"; do
  read -r name limit <<<"$entry"
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
