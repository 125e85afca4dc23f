#!/usr/bin/env bash
# The prepared device check (issue 34; fits 8 minutes on one H100):
#   1. environment facts (GPU, driver, torch, CUDA, cuDNN)
#   2. the CUDA test set: pytest -m gpu tests/gpu (CPU vs CUDA steps of every method, bf16,
#      compile, channels_last, JVP, sampling, eval, cross-device resume, DDP/NCCL)
#   3. training throughput and peak memory at the CIFAR-10 recipes' shapes
#      (benchmarks/gpu_throughput.py: CD-LPIPS, CT, ECT, sCT, bare passes x fp32/bf16/compiled),
#      rows written into BENCHMARKS.md (replacing this device's earlier rows)
#   4. a one-screen summary
#
#   bash scripts/device_check.sh               # on a GPU machine (about 8 min on one H100)
#   bash scripts/device_check.sh --cpu-smoke   # anywhere: tiny shapes on the CPU, about a minute;
#                                              # writes nothing into the repository; compiled
#                                              # rows run eagerly (TORCH_COMPILE_DISABLE=1)
# Options: --out DIR (logs, JSON; default a temporary folder), --budget-s S (whole check, 480).
# Python: $PYTHON, else .venv/bin/python, else python. Exit status: non-zero if a test failed or
# a step did not run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
SMOKE=0
BUDGET=480
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (expected --cpu-smoke, --out DIR, --budget-s S)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python; fi
OUT=${OUT:-$(mktemp -d -t device_check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}
START=$(date +%s)
STATUS=0
elapsed() { echo $(( $(date +%s) - START )); }

echo "== 1/3 environment"
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  # the script's compile path runs, the compiler does not (a CPU compile takes a minute; the
  # compiler is tested by tests/gpu and the slow suite)
  export TORCH_COMPILE_DISABLE=1
else
  DEVICE=cuda
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
"$PY" - "$DEVICE" > "$OUT/environment.txt" <<'EOF' || STATUS=1
import sys, torch
dev = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
      f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if dev == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible (use --cpu-smoke on a machine without a GPU)")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
              f"bf16: {torch.cuda.is_bf16_supported()}")
else:
    print("device: CPU (smoke)")
EOF
cat "$OUT/environment.txt"
[ "$STATUS" = 0 ] || { echo "error: the environment check failed"; exit 1; }

echo "== 2/3 CUDA test set: pytest -m gpu tests/gpu"
T0=$(date +%s)
TEST_LIMIT=$(( BUDGET * 45 / 100 ))
timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfEs \
  --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
RC=$?
TEST_S=$(( $(date +%s) - T0 ))
tail -n 25 "$OUT/gpu_tests.log"
TESTS=$(grep -E '^[=]* ?[0-9]+ (passed|failed|skipped|error)' "$OUT/gpu_tests.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
if [ "$RC" = 124 ]; then TESTS="timed out after ${TEST_LIMIT} s (${TESTS:-no summary})"; STATUS=1
elif [ "$RC" != 0 ]; then STATUS=1; fi

echo "== 3/3 training throughput"
REMAINING=$(( BUDGET - $(elapsed) - 60 ))
[ "$REMAINING" -lt 30 ] && REMAINING=30
if [ "$SMOKE" = 1 ]; then
  BENCH=(--device cpu --net tiny --batch 2 --steps 1 --warmup 0 --lpips-resize null
         --compiled-recipes bare_ncsnpp --write "$OUT/BENCHMARKS.md")
  WRITTEN="$OUT/BENCHMARKS.md (smoke: BENCHMARKS.md is left alone)"
else
  BENCH=(--device cuda --budget-s "$(( REMAINING * 70 / 100 ))" --write "$ROOT/BENCHMARKS.md")
  WRITTEN="BENCHMARKS.md"
fi
timeout "$REMAINING" "$PY" benchmarks/gpu_throughput.py "${BENCH[@]}" --json "$OUT/throughput.json" \
  > "$OUT/throughput.log" 2>&1
BRC=$?
[ "$BRC" = 0 ] || { STATUS=1; tail -n 30 "$OUT/throughput.log"; }

echo
echo "================ device check summary ($( [ "$SMOKE" = 1 ] && echo 'CPU smoke' || echo 'full'))"
sed 's/^/environment: /' "$OUT/environment.txt"
echo "tests: ${TESTS:-no result} (pytest -m gpu tests/gpu, ${TEST_S} s, exit ${RC})"
if [ "$BRC" = 0 ]; then
  sed -n '/^== throughput/,$p' "$OUT/throughput.log"
else
  echo "throughput: failed (exit $BRC), see $OUT/throughput.log"
fi
echo "rows: $WRITTEN"
[ "$SMOKE" = 1 ] && echo "smoke: tiny network, batch 2, CPU; compiled rows ran eagerly (TORCH_COMPILE_DISABLE=1)"
echo "logs: $OUT"
echo "total: $(elapsed) s, status $STATUS"
exit "$STATUS"
