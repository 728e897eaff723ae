#!/usr/bin/env bash
# One prepared check of the GPU path on one CUDA machine, 7.5 minutes at most, leaving at most 8 files in
# OUT_DIR (see README "Checking a GPU machine"):
#   summary.json    every step's status, time and error, and the environment (GPU, driver, torch, cupy, NVRTC)
#   steps.log       the steps' output
#   pytest_gpu.log  pytest -m gpu
#   sanitizer.log   compute-sanitizer memcheck over one GEMV and one dequantize per format
#   parity.json     CPU vs CUDA greedy tokens and logit error: tiny models and a SmolLM2-shaped synthetic
#                   model, all-resident and streamed
#   decode.json     decode tok/s of a SmolLM2-shaped model and 4 Llama-70B-shaped blocks, each resident,
#                   streamed from pinned RAM (30% VRAM budget) and hybrid (host layers on the CPU at
#                   decode): bytes per token, achieved GB/s against the plan's prediction, and a summary of...
#   trace70b.json   ...the streamed 70B-shaped run's engine trace (reads, uploads, compute, their overlap)
#   bench.json      GEMV GB/s vs the HBM peak at T=1..8 on 70B shapes; pinned vs pageable H2D GB/s
# Models are generated here (nothing large needs to travel). Needs the project, torch, cupy and the
# `gguf` package: when gguf is not importable, its wheel is installed from --wheels (default .whl/).
#
# Usage: scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--dry-run]
#        scripts/gpu_check.sh --fetch-wheels [DIR]   (on a machine with an index: the gguf wheel the run
#                                                     installs, default .whl/, for a machine without one)
#   --dry-run: the same steps on the CPU with tiny models (CI checks the structure this way).
# Exit status 0 when every step passed, 1 otherwise (summary.json says which and why).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD

OUT=""
WHEELS="$REPO/.whl"
DRY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --dry-run) DRY="--dry-run"; shift ;;
        --fetch-wheels)
            dest=${2:-$WHEELS}
            ver=$(${PYTHON:-python3} -c "from importlib.metadata import version; print(version('gguf'))") || exit 2
            # pure Python: one wheel for every Python 3 (the GPU image runs 3.12)
            exec ${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: -d "$dest" "gguf==$ver" ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) if [ -z "$OUT" ]; then OUT=$1; shift; else echo "error: unexpected argument $1" >&2; exit 2; fi ;;
    esac
done
[ -n "$OUT" ] || { echo "error: usage: scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT"/summary.json "$OUT"/steps.log "$OUT"/pytest_gpu.log "$OUT"/sanitizer.log

PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-450}       # the whole run, seconds (7.5 minutes: well inside one 10-minute device call)
T0=$(date +%s)
PYTEST_TARGETS=tests                    # every -m gpu test
if [ -n "$DRY" ]; then PYTEST_TARGETS=tests/test_kernels_gpu.py; fi  # CPU: the step's plumbing only

# step NAME LIMIT_S LOGFILE CMD...: runs CMD with a time limit (never past the run's budget) and records it.
step() {
    local name=$1 limit=$2 log=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "=== step $name === not started: the run's ${BUDGET} s budget is spent" >>"$OUT/steps.log"
        $PY scripts/gpu_check.py record "$OUT" "$name" 124 0 "$limit" $DRY
        return
    fi
    echo "=== step $name === (limit ${limit} s)" | tee -a "$OUT/steps.log"
    local start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    [ "$log" != "$OUT/steps.log" ] && tail -n 5 "$log" >>"$OUT/steps.log"
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    $PY scripts/gpu_check.py record "$OUT" "$name" "$rc" "$((ms / 1000)).$((ms % 1000 / 100))" "$limit" $DRY
    echo "    $name: rc $rc, $((ms / 1000)) s"
}

setup() {
    if $PY -c "import gguf" 2>/dev/null; then echo "gguf already importable"; return 0; fi
    local whl
    whl=$(ls "$WHEELS"/gguf-*.whl 2>/dev/null | head -n 1)
    [ -n "$whl" ] || { echo "gguf is not installed and no gguf wheel in $WHEELS"; return 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$whl" || return 1
    echo "installed $whl into $WORK/site"
}

export PY WHEELS WORK
export -f setup
step setup 60 "$OUT/steps.log" bash -c setup
[ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site:$PYTHONPATH"
step env 60 "$OUT/steps.log" $PY scripts/gpu_check.py env "$OUT" $DRY
step warm 90 "$OUT/steps.log" $PY scripts/gpu_check.py warm "$OUT" $DRY
SANITIZER=$(command -v compute-sanitizer || echo compute-sanitizer)
if [ -n "$DRY" ]; then  # no GPU: run the target plainly (it records that it has nothing to check)
    step memcheck 60 "$OUT/sanitizer.log" $PY scripts/gpu_check.py memcheck "$OUT" $DRY
else
    step memcheck 90 "$OUT/sanitizer.log" "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 \
        $PY scripts/gpu_check.py memcheck "$OUT"
fi
step parity 100 "$OUT/steps.log" $PY scripts/gpu_check.py parity "$OUT" --work "$WORK" $DRY
step decode 140 "$OUT/steps.log" $PY scripts/gpu_check.py decode "$OUT" --work "$WORK" $DRY
step bench 80 "$OUT/steps.log" $PY scripts/gpu_check.py bench "$OUT" --work "$WORK" $DRY
step pytest 150 "$OUT/pytest_gpu.log" $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts=-ra $PYTEST_TARGETS
$PY scripts/gpu_check.py finish "$OUT" $DRY
