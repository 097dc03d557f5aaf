#!/usr/bin/env bash
# Every GPU check of ktnas in one run of at most 8 minutes on a GPU machine (one CUDA device, no network needed).
#
#   bash bench/gpu-check.sh [--dry-run] [--return DIR]
#
# Works under runs/gpu-check (WORK to change it) and leaves two files in the return folder (--return DIR, else $OUT
# when set, else runs/gpu-check/return): summary.md (one line per check, then the predicted and measured figures)
# and gpu-check.tar.gz (every log, JSON, Markdown table and picture; not the feature store).
# --dry-run (no GPU): the CPU branch: every GPU command parses, the kernel tests are collected (the test suite runs
# them through Triton's interpreter), the step profile at a tiny batch, the comparison of predicted and measured
# figures.
#
# Checks (each with its own time limit; one that fails or times out is recorded in summary.md, the rest go on):
#   1. env            nvidia-smi, torch / triton / CUDA versions
#   2. doctor         ktnas doctor --device cuda: the fused kernels against the reference at every specialisation
#                     the default supernets use, the captured step against the eager one, the profile's peak
#   3. profile        ktnas bench step (CPU, fake tensors), DARTS 1st and 2nd order: the predictions, run in the
#                     background beside the GPU checks (it needs no GPU)
#   4. triton-tests   the kernel tests with the kernels compiled for the GPU (pytest-xdist, 8 workers)
#   5. kernels        ktnas bench kernels --device cuda: two edge shapes, fp32 and bf16, fused against eager
#   6. search         ktnas bench search --device cuda, DARTS 1st and 2nd order, DARTS space (builds its store of
#                     Fashion-MNIST through the ImageNet MobileNetV2 stem)
#   7. captured       ktnas search itself on that store, its default step (--capture auto: one CUDA graph per step,
#                     --recompute edge, --kernels auto), second order, --max-memory 2GiB: one epoch of 2048 samples
#   8. graph-used     the captured search's metrics.jsonl: its steps replayed a CUDA graph, its edges ran the fused
#                     kernels, nothing fell back
#   9. compare        predicted (profile) against measured (search) peak memory and step time: compare.md
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
RETURN=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --return) RETURN=$2; shift ;;
    *) echo "gpu-check: unknown argument $1 (use --dry-run, --return DIR)" >&2; exit 2 ;;
  esac
  shift
done
WORK=${WORK:-runs/gpu-check}
RETURN=${RETURN:-$WORK/return}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
rm -rf "$WORK/logs"
mkdir -p "$WORK/logs" "$RETURN"
LOGS=$WORK/logs
SUMMARY="$LOGS/summary.md"
START=$(date +%s)
echo "# ktnas GPU check ($(date -u +%FT%TZ), $([ $DRY = 1 ] && echo dry run || echo GPU run))" > "$SUMMARY"
echo "| check | status | seconds | log |" >> "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

if ! "$PY" -c "import ktnas.bench, zarr" 2>/dev/null; then
  echo "gpu-check: ktnas (with zarr) is not importable by $PY: run 'make setup', or install ktnas there" >&2
  exit 1
fi

KTNAS=("$PY" -m ktnas.engine.cli)
STORE=$WORK/bench-search/features.zarr
DOCTOR=(doctor --device cuda --out "$LOGS/doctor")
PROFILE=(bench step --algos darts-1,darts-2 --spaces darts --out "$LOGS/bench-step")
KERNELS=(bench kernels --device cuda --shapes "64,16,32,32;64,32,16,16" --dtypes fp32,bf16 --impls eager,triton
         --out "$LOGS/bench-kernels")
SEARCH=(bench search --device cuda --algos darts-1,darts-2 --spaces darts --steps 10 --warmup 3
        --out "$WORK/bench-search")
CAPTURED=(search --features "$STORE" --device cuda --order 2 --epochs 1 --limit 2048 --batch-size 64
          --max-memory 2GiB --quiet --out "$WORK/search-captured")
TRITON_TESTS=(-m pytest -q -n 8 tests/test_triton_mixed.py -p no:cacheprovider)
if [ $DRY = 1 ]; then  # the CPU branch: small enough for a test
  PROFILE=(bench step --quick --configs baseline,cached --algos darts-1 --spaces darts --batch-size 2
           --out "$LOGS/bench-step")
  TRITON_TESTS=(-m pytest -q --collect-only tests/test_triton_mixed.py -p no:cacheprovider)  # run by the suite
fi

record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 | $1.log |" >> "$SUMMARY"
  echo "gpu-check: $1: $2 (${3}s)" >&2
}

check() {  # check NAME LIMIT_S CMD...: run CMD with a time limit, log to $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local st=ok
  [ $rc = 124 ] && st="timed out after ${limit}s"
  [ $rc != 0 ] && [ $rc != 124 ] && st="failed (exit $rc)"
  record "$name" "$st" $((SECONDS - t0))
}

parses() {  # parses NAME ARGS...: the ktnas command line is accepted (dry run of a GPU-only check)
  local name=$1
  shift
  "$PY" - "$@" > "$LOGS/$name.log" 2>&1 <<'EOF'
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
} > "$LOGS/env.log" 2>&1
record env ok 0

# 3. the profile, in the background (CPU only); waited for before the comparison
t_prof=$SECONDS
timeout --kill-after=10 300 "${KTNAS[@]}" "${PROFILE[@]}" > "$LOGS/profile.log" 2>&1 &
PROF_PID=$!

if [ $DRY = 1 ]; then
  parses doctor "${DOCTOR[@]}"
  check triton-tests 300 "$PY" "${TRITON_TESTS[@]}"
  parses kernels "${KERNELS[@]}"
  parses search "${SEARCH[@]}"
  parses captured "${CAPTURED[@]}"
else
  check doctor 120 "${KTNAS[@]}" "${DOCTOR[@]}"
  check triton-tests 100 env -u TRITON_INTERPRET "$PY" "${TRITON_TESTS[@]}"
  check kernels 60 "${KTNAS[@]}" "${KERNELS[@]}"
  check search 100 "${KTNAS[@]}" "${SEARCH[@]}"
  check captured 60 "${KTNAS[@]}" "${CAPTURED[@]}"
  cp "$WORK/search-captured/metrics.jsonl" "$WORK/search-captured/config.json" "$LOGS/" 2>/dev/null
  cp "$WORK/bench-search/results.json" "$LOGS/bench-search.json" 2>/dev/null
  cp "$WORK/bench-search/results.md" "$LOGS/bench-search.md" 2>/dev/null
  check graph-used 10 "$PY" -c "
import json, sys
rec = json.loads(open('$LOGS/metrics.jsonl').read().splitlines()[-1])
print(json.dumps(dict(steps=rec['steps'], eval=rec['eval'], kernels=rec['kernels']), indent=1))
ok = rec['steps']['mode'] == 'graph' and rec['steps']['replays'] > 0 and rec['kernels']['triton'] > 0 \
     and not rec['kernels']['fell_back'] and rec['eval']['mode'] == 'graph'
sys.exit(0 if ok else 1)"
fi

wait $PROF_PID
rc=$?
record profile "$([ $rc = 0 ] && echo ok || echo "failed (exit $rc)")" $((SECONDS - t_prof))

# 9. predicted against measured
MEASURED=$LOGS/bench-search.json
[ $DRY = 1 ] && MEASURED=$WORK/bench-search/results.json
check compare 30 "$PY" -m ktnas.bench.compare "$LOGS/bench-step/results.json" "$MEASURED" --out "$LOGS/compare.md"
{
  echo ""
  echo "total: $(( $(date +%s) - START )) s"
  echo ""
  cat "$LOGS/compare.md" 2>/dev/null
} >> "$SUMMARY"

# what comes back: summary.md and one tarball of the logs (logs, JSON, tables, pictures; no store)
cp "$SUMMARY" "$RETURN/summary.md"
tar -czf "$RETURN/gpu-check.tar.gz" -C "$WORK" logs
cat "$SUMMARY"
! grep -q "failed\|timed out\|does not parse" "$SUMMARY"
