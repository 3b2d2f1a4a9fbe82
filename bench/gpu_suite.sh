#!/usr/bin/env bash
# The checks that need a GPU, in one go on a CUDA host, each step under a time
# limit and the whole within a budget (GPU_SUITE_SECONDS, default 480):
#   the CUDA tests, then bench/throughput.py, protocol_overhead.py, hot_path.py,
#   http_load.py (shm-embed, per-worker and infinity at float16) and
#   bench/fidelity.py where it exists, at small fixed sizes.
# Sets up .venv when it is missing (with the host's CUDA torch when a Python
# here has one; otherwise `make venv`, whose torch is the CPU build). Without a
# usable CUDA device it says so and runs the CPU parts at float32.
#
#     bash bench/gpu_suite.sh [OUTDIR]      # default: $OUT, else ./gpu-suite-out
#
# Writes OUTDIR/suite.log (every step's output), OUTDIR/setup.log (installs)
# and OUTDIR/summary.txt (one line per step: exit code, seconds).
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-suite-out}}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/suite.log SETUP_LOG=$OUTDIR/setup.log SUMMARY=$OUTDIR/summary.txt
: >"$LOG"; : >"$SETUP_LOG"; : >"$SUMMARY"
BUDGET=${GPU_SUITE_SECONDS:-480}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=.venv/bin/python
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# step NAME CAP_SECONDS COMMAND...: run under min(CAP, what is left of the budget).
step() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        say "=== $name: skipped, the suite's budget of ${BUDGET}s is spent"
        echo "$name skipped (budget spent)" >>"$SUMMARY"
        return
    fi
    say "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" (stopped at its limit)"
    say "=== $name: exit $rc after $((SECONDS - t0))s$note"
    echo "$name exit=$rc seconds=$((SECONDS - t0))$note" >>"$SUMMARY"
}

# --- the environment ---------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
else
    say "nvidia-smi: not on this host"
fi
if [ ! -x "$PY" ]; then
    cuda_python=""
    for candidate in python3.11 python3 python3.12; do
        if command -v "$candidate" >/dev/null \
            && "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            cuda_python=$candidate
            break
        fi
    done
    t0=$SECONDS
    if [ -n "$cuda_python" ]; then
        say "=== setting up .venv on $cuda_python's CUDA torch (every other package from requirements.lock)"
        grep -v '^torch==' requirements.lock >"$OUTDIR/requirements-no-torch.txt"
        { "$cuda_python" -m venv --system-site-packages .venv \
            && $PY -m pip install --quiet -r "$OUTDIR/requirements-no-torch.txt" \
            && $PY -m pip install --quiet --no-deps --no-build-isolation -e . \
            && touch .venv/.installed; } >>"$SETUP_LOG" 2>&1
        rc=$?
        rm -f "$OUTDIR/requirements-no-torch.txt"
    else
        say "=== setting up .venv with make venv (no Python here has a CUDA torch)"
        make venv >>"$SETUP_LOG" 2>&1
        rc=$?
    fi
    say "=== setup: exit $rc after $((SECONDS - t0))s"
    echo "setup-venv exit=$rc seconds=$((SECONDS - t0))" >>"$SUMMARY"
fi
if [ ! -x "$PY" ]; then
    say "no .venv could be set up: see $SETUP_LOG"
    exit 1
fi
ls shm_protocol/_hotpath*.so >/dev/null 2>&1 || $PY setup.py -q build_ext --inplace >>"$SETUP_LOG" 2>&1

if cuda_line=$($PY -c 'import torch; assert torch.cuda.is_available(), "torch " + torch.__version__ + " sees no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' 2>&1); then
    DEVICE=cuda DTYPE=float16
    say "CUDA: torch $cuda_line"
else
    DEVICE=cpu DTYPE=float32
    say "!!! CUDA IS NOT USABLE HERE (${cuda_line##*$'\n'}): the CUDA tests skip, the benchmarks run on the CPU at float32"
fi
export SHM_EMBED_DEVICE=$DEVICE SHM_EMBED_DTYPE=$DTYPE

# The infinity environment is built before the clock of the load benchmark starts (once per host).
step infinity-env 150 $PY -c 'import sys; sys.path.insert(0, "bench"); from _peers import infinity_python; print(infinity_python())'

# --- the checks --------------------------------------------------------------------------------
step cuda-tests 75 $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py
step throughput 60 $PY bench/throughput.py --procs 4 --seconds 3 --texts queries
step protocol-overhead 45 $PY bench/protocol_overhead.py --requests 200 --block 50 --device "$DEVICE" \
    --work model,synthetic:0
step hot-path 25 $PY bench/hot_path.py --requests 2000 --sleeps
step http-load 180 $PY bench/http_load.py --setups shm-embed,per-worker,infinity --device "$DEVICE" --dtype "$DTYPE" \
    --seconds 3 --cells 1x1,16x1,16x32 --texts queries,passages
if [ -f bench/fidelity.py ]; then
    step fidelity 45 $PY bench/fidelity.py
fi
say "=== done in $((SECONDS - START))s; summary:"
tee -a "$LOG" <"$SUMMARY"
