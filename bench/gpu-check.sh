#!/usr/bin/env bash
# Every GPU check of ktnas in one run of at most 9 minutes on a bare GPU machine; every report under $OUT.
#
# Where a GPU is lent (no network there): stage here with `bash ../shared/gpu/prepare.sh`, then run through the
# device tool with carry [".gpu"]:   source .gpu/setup.sh && bash bench/gpu-check.sh
# Without a GPU:                      bash bench/gpu-check.sh --dry-run
#   checks that every command below parses, and runs the CPU branch: the Triton tests through the interpreter
#   (a few), the step profile at a tiny batch, the comparison of predicted and measured figures.
#
# Checks (each with its own time limit; one that fails or times out is recorded in summary.md, the rest go on):
#   1. env            nvidia-smi, torch / triton / CUDA versions
#   2. profile        ktnas bench step (CPU, fake tensors), DARTS 1st and 2nd order: the predictions, run in the
#                     background beside the GPU checks (it needs no GPU)
#   3. triton-tests   the kernel tests with the kernels compiled for the GPU (TRITON_INTERPRET unset)
#   4. kernels        ktnas bench kernels --device cuda
#   5. search         ktnas bench search --device cuda, DARTS 1st and 2nd order, DARTS space (builds its store of
#                     Fashion-MNIST through the ImageNet MobileNetV2 stem)
#   6. captured       ktnas search itself on that store, its default step (--capture auto: one CUDA graph per step,
#                     --recompute edge), second order, --max-memory 2GiB (the profile's pick, a trial confirms):
#                     one epoch of 2048 samples; metrics.jsonl has its seconds and peak memory
#   7. compare        predicted (profile) against measured (search) peak memory and step time: compare.md
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
echo "# ktnas GPU check ($(date -u +%FT%TZ), $([ $DRY = 1 ] && echo dry run || echo GPU run))" > "$SUMMARY"
echo "| check | status | seconds | log |" >> "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

# a bare machine: what the staged wheels and weights provide (prepare.sh wrote .gpu/setup.sh)
if ! "$PY" -c "import ktnas.bench, zarr, hdf5plugin" 2>/dev/null; then
  if [ -f .gpu/setup.sh ]; then
    # shellcheck disable=SC1091
    source .gpu/setup.sh || { echo "gpu-check: .gpu/setup.sh failed" >&2; exit 1; }
  else
    echo "gpu-check: ktnas is not installed here and .gpu/setup.sh is missing: run 'make setup', or stage with" \
         "'bash ../shared/gpu/prepare.sh' and pass .gpu along" >&2
    exit 1
  fi
fi
export KTNAS_DATA=${KTNAS_DATA:-${KTNAS_GPU_DATA:-}}
export PYTHONWARNINGS=ignore

KTNAS=("$PY" -m ktnas.engine.cli)
PROFILE=(bench step --algos darts-1,darts-2 --spaces darts --out "$OUT/bench-step")
KERNELS=(bench kernels --device cuda --out "$OUT/bench-kernels")
SEARCH=(bench search --device cuda --algos darts-1,darts-2 --spaces darts --steps 10 --warmup 3
        --out "$OUT/bench-search")
CAPTURED=(search --features "$OUT/bench-search/features.zarr" --device cuda --order 2 --epochs 1 --limit 2048
          --batch-size 64 --max-memory 2GiB --quiet --out "$OUT/search-captured")
TRITON_TESTS=(-m pytest -q -x tests/test_triton_mixed.py -p no:cacheprovider)
if [ $DRY = 1 ]; then  # the CPU branch: small enough for a test
  PROFILE=(bench step --quick --configs baseline,cached --batch-size 2 --out "$OUT/bench-step")
  TRITON_TESTS=(-m pytest -q -x tests/test_triton_mixed.py -p no:cacheprovider -k "test_darts_full_float32 or test_nb201_no_pool_bn_float32")
fi

record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 | $1.log |" >> "$SUMMARY"
  echo "gpu-check: $1: $2 (${3}s)" >&2
}

check() {  # check NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local st=ok
  [ $rc = 124 ] && st="timed out after ${limit}s"
  [ $rc != 0 ] && [ $rc != 124 ] && st="failed (exit $rc)"
  record "$name" "$st" $((SECONDS - t0))
}

parses() {  # parses NAME ARGS...: the ktnas command line is accepted (dry run of a GPU-only check)
  local name=$1
  shift
  "$PY" - "$@" > "$OUT/$name.log" 2>&1 <<'EOF'
import sys
from ktnas.engine.cli import build_parser
args = build_parser().parse_args(sys.argv[1:])
print("parses:", "ktnas", " ".join(sys.argv[1:]))
EOF
  local rc=$?
  record "$name" "$([ $rc = 0 ] && echo 'dry run: command parses' || echo "command does not parse (exit $rc)")" 0
}

# 1. env
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); \
print('triton', triton.__version__)"
} > "$OUT/env.log" 2>&1
record env ok 0

# 2. the profile, in the background (CPU only); waited for before the comparison
t_prof=$SECONDS
timeout --kill-after=10 420 "${KTNAS[@]}" "${PROFILE[@]}" > "$OUT/profile.log" 2>&1 &
PROF_PID=$!

# 3-6. on the GPU
if [ $DRY = 1 ]; then
  check triton-tests 300 "$PY" "${TRITON_TESTS[@]}"
  parses kernels "${KERNELS[@]}"
  parses search "${SEARCH[@]}"
  parses captured "${CAPTURED[@]}"
else
  check triton-tests 120 env -u TRITON_INTERPRET "$PY" "${TRITON_TESTS[@]}"
  check kernels 80 "${KTNAS[@]}" "${KERNELS[@]}"
  check search 200 "${KTNAS[@]}" "${SEARCH[@]}"
  check captured 90 "${KTNAS[@]}" "${CAPTURED[@]}"
  cp "$OUT/search-captured/metrics.jsonl" "$OUT/search-captured/config.json" "$OUT/" 2>/dev/null
fi

wait $PROF_PID
rc=$?
record profile "$([ $rc = 0 ] && echo ok || echo "failed (exit $rc)")" $((SECONDS - t_prof))

# 7. predicted against measured
check compare 30 "$PY" -m ktnas.bench.compare "$OUT/bench-step/results.json" "$OUT/bench-search/results.json" \
  --out "$OUT/compare.md"
echo "" >> "$SUMMARY"
echo "total: $(( $(date +%s) - START )) s" >> "$SUMMARY"
cat "$SUMMARY"
! grep -q "failed\|timed out\|does not parse" "$SUMMARY"
