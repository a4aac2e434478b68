#!/usr/bin/env bash
# The GPU check (issue 16): every speed goal measured in one run of under 8 minutes on one H200.
#
#   bash bench/device.sh RESULTS_DIR            # on the GPU machine, from the repository root
#   bash bench/device.sh --quick RESULTS_DIR    # the same steps on CPU at toy sizes (tests/test_bench.py)
#
# Steps, in order, each bounded by `timeout` (its cap, or what is left of DEVICE_BUDGET_S): the wheels from
# .whl/ (make wheels) installed into a temporary folder, pydensecrf2 built from its sdist in the background,
# the CUDA tests, bench/train.py (parity vs fast), bench/infer.py, bench/crf.py, the real stages on CUDA
# (bench/stages.py), and last the torch.compile training row (its compilation is the least predictable part).
# Each step appends one JSON line to RESULTS_DIR/results.jsonl as soon as it ends, and prints it: what it
# measured, or why it did not (timeout, failure with the end of its stderr, skipped). Every step's stderr goes
# to RESULTS_DIR/log.txt, the goals table at the end to stdout and RESULTS_DIR/summary.txt.
set -u
cd "$(dirname "$0")/.."

QUICK=0
if [ "${1:-}" = --quick ]; then QUICK=1; shift; fi
OUT=${1:?usage: bash bench/device.sh [--quick] RESULTS_DIR}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl LOG=$OUT/log.txt
: >"$RESULTS"
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${DEVICE_BUDGET_S:-$([ $QUICK = 1 ] && echo 300 || echo 450)}  # --quick: room for a loaded CI machine
START=$SECONDS
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site CRFSITE=$WORK/pydensecrf
mkdir -p "$SITE" "$CRFSITE"
# The shipped wheels come before the image's packages; MLflow is not there, so the stages log nothing.
export PYTHONPATH=$PWD:$SITE:$CRFSITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 DEEPLAB_TRACKING=off MLFLOW_DISABLE_TELEMETRY=true DEVICE_QUICK=$QUICK
# Toy sizes on a small shared CPU: one thread each, or an OpenMP team spins waiting on a descheduled thread.
if [ $QUICK = 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

record() {  # NAME RC WALL LIMIT [NOTE]
    $PY bench/device_report.py record "$RESULTS" "$1" "$2" "$3" "$4" "$WORK/$1.out" "$WORK/$1.err" ${5:+"$5"}
}

# step NAME CAP_S COMMAND...: run COMMAND for at most CAP_S seconds (less if the budget is nearly spent).
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left > 0 ? left : 0))
    : >"$WORK/$name.out" >"$WORK/$name.err"
    if [ $limit -lt 10 ]; then
        record "$name" 0 0 "$limit" "not run: ${left}s of the ${BUDGET}s budget left"
        return
    fi
    echo "== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    cat "$WORK/$name.err" >>"$LOG"
    record "$name" $rc $((SECONDS - t0)) "$limit"
}

step env 60 $PY bench/device_report.py env "$WORK/env.jsonl"

# 0. Packages the image lacks (bench/device-wheels.txt), never over the image's own: --target, not site-packages.
CRF_PID=
if [ $QUICK = 1 ]; then
    : >"$WORK/wheels.out" >"$WORK/wheels.err"
    record wheels 0 0 0 "skipped in --quick: the installed packages are used"
    record pydensecrf 0 0 0 "skipped in --quick: the installed packages are used"
elif ! ls .whl/*.whl >/dev/null 2>&1; then
    : >"$WORK/wheels.out" >"$WORK/wheels.err"
    record wheels 0 0 0 "no .whl/ folder (make wheels): using what the machine has"
else
    step wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $(ls .whl/*.whl | grep -iv '/cython-')
    # pydensecrf2 has no wheel: build the sdist with the shipped Cython (the version it pins) in the background,
    # on one core while the GPU steps run; bench/crf.py waits for it, and runs its torch rows without it.
    left=$((BUDGET - (SECONDS - START)))
    CRF_LIMIT=$((left < 240 ? left : 240))
    if [ $CRF_LIMIT -lt 10 ]; then
        : >"$WORK/pydensecrf.out" >"$WORK/pydensecrf.err"
        record pydensecrf 0 0 0 "not run: ${left}s of the ${BUDGET}s budget left"
    elif ls .whl/pydensecrf2-*.tar.gz .whl/[Cc]ython-*.whl >/dev/null 2>&1; then
        CRF_T0=$SECONDS
        export PY WORK CRFSITE
        # timeout runs it in its own process group and ends all of it (pip, the compilers) when time is up
        timeout -k 10 $CRF_LIMIT bash -c '
            $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/cython" .whl/[Cc]ython-*.whl &&
            PYTHONPATH=$WORK/cython:$PYTHONPATH $PY -m pip install -q --no-index --no-deps --no-build-isolation \
                --no-cache-dir --target "$CRFSITE" .whl/pydensecrf2-*.tar.gz &&
            $PY -c "import json, pydensecrf.densecrf as m; print(json.dumps({\"module\": m.__file__}))"' \
            >"$WORK/pydensecrf.out" 2>"$WORK/pydensecrf.err" &
        CRF_PID=$!
    else
        : >"$WORK/pydensecrf.out" >"$WORK/pydensecrf.err"
        record pydensecrf 0 0 0 "no pydensecrf2 sdist or Cython wheel in .whl/: crf rows without pydensecrf2"
    fi
fi

# 1. CUDA tests (files that hold them; -k cuda picks the tests, which skip without a GPU).
CUDA_TESTS=(tests/test_permutohedral.py)
step cuda_tests 90 $PY bench/device_report.py pytest "$WORK/cuda_tests.xml" "${CUDA_TESTS[@]}" -k cuda

# 2-4. The benchmarks: full size on the GPU, toy size on CPU.
if [ $QUICK = 1 ]; then
    step train 60 $PY bench/train.py --quick --iters 2 --warmup 1 --batch 2 --size 65 --profile 1
    step infer 40 $PY bench/infer.py --quick --images 2 --warmup 1 --size 65 --profile 1
else
    step train 120 $PY bench/train.py
    step infer 75 $PY bench/infer.py
fi

if [ -n "$CRF_PID" ]; then  # the build ends within the budget (its timeout)
    wait "$CRF_PID"
    rc=$?
    record pydensecrf $rc $((SECONDS - CRF_T0)) $CRF_LIMIT \
        "$([ $rc = 0 ] || echo 'build failed: the crf rows run without pydensecrf2')"
    cat "$WORK/pydensecrf.err" >>"$LOG"
fi
if [ $QUICK = 1 ]; then
    # one joblib job: the same code, without starting worker processes that each import torch
    step crf 40 $PY bench/crf.py --quick --sizes 48 --images 1 --large-images 1 --jobs 1
else
    step crf 150 $PY bench/crf.py --no-torch-cpu
fi

# 5. The real stages on CUDA: the stage path, not only the benchmarks, runs on a GPU.
step stages 150 $PY bench/stages.py "$WORK/stages" $([ $QUICK = 1 ] && echo --quick)

# 2b. torch.compile as its own row, beside a fresh fast row; it gets what is left of the budget.
if [ $QUICK = 1 ]; then
    step train_compile 120 $PY bench/train.py --quick --modes fast compile --iters 1 --warmup 1 --batch 2 \
        --size 65 --profile 0
else
    step train_compile 240 $PY bench/train.py --modes fast compile --iters 20 --warmup 5 --profile 3
fi

# 2c. DeepLab v3+ (output stride 16, crop 513, batch 16: the seeds' recipe) training speed and memory.
if [ $QUICK = 1 ]; then
    step train_v3plus 60 $PY bench/train.py --quick --arch deeplabv3plus --output-stride 16 --modes fast --iters 1 \
        --warmup 1 --batch 2 --size 65 --profile 0
else
    step train_v3plus 150 $PY bench/train.py --arch deeplabv3plus --output-stride 16 --size 513 --batch 16 \
        --iter-size 1 --modes fast --iters 20 --warmup 5 --profile 0
fi

$PY bench/device_report.py summary "$RESULTS" | tee "$OUT/summary.txt"
echo "results: $RESULTS ($(wc -l <"$RESULTS") lines, $((SECONDS - START)) s)"
