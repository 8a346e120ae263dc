#!/usr/bin/env bash
# The GPU suite: one command for a GPU machine without internet, run from the repository root.
#
#     bash benchmarks/gpu_suite.sh
#
# Steps, each under its own `timeout` (and all under one deadline, SUITE_BUDGET_S, default 360 s), so that
# one slow step cannot eat the budget:
#   1. pip install --no-build-isolation --no-deps -e .   (also builds the CUDA library when csrc/ has kernels)
#   2. python -m hilt.info
#   3. python -m pytest -q tests/ops/test_triton_gpu.py tests/cuda/test_cuda_ops.py tests/ops (log in tests.log)
#      with HILT_TRITON_FIXED_CONFIG=1: each autotuned kernel runs the first config its pruner keeps, so the
#      run compiles one config per kernel variant instead of all of them; test_every_kept_config_on_gpu (first)
#      (in test_triton_gpu.py, run first) runs every kept config at representative shapes. The interpreter-only config sweep and the sm_90
#      compile check (CPU work, run in CI) are left out.
#   4. benchmarks/bench_attention.py at DESIGN.md's target (B·T = 64k tokens, H 16, D 64, bf16) — FIRST
#   5. benchmarks/bench_small_ops.py, benchmarks/bench_models.py
#   6. if time is left: a bench_attention sweep over head dims 32/128 and fp16 (fwd+bwd, no FlexAttention)
# Results: at most 8 files in one folder — $OUT when set (the device tool collects $OUT), else
# benchmarks/results/gpu-<date>/ — repacked after every step, so a run cut short still returns what it did:
#   results.tar.gz (every JSON, markdown, PNG and log), summary.md, suite.log, tests.log, info.txt, install.log
#
# Knobs (environment): PYTHON (default python3), SUITE_BUDGET_S, SUITE_SKIP_INSTALL=1, SUITE_SKIP_TESTS=1,
# SUITE_TEST_ARGS (default "-q tests -x"), SUITE_QUICK=1 (pass --quick to the benchmarks: a CPU dry run).
set -u

PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-370}
START=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then DEST=$OUT; else DEST=benchmarks/results/gpu-$STAMP; fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
RAW=$(mktemp -d "${TMPDIR:-/tmp}/hilt-gpu-suite.XXXXXX")
export PYTHONUNBUFFERED=1
QUICK=()
if [ "${SUITE_QUICK:-0}" = 1 ]; then QUICK=(--quick); fi

exec > >(tee -a "$DEST/suite.log") 2>&1
echo "hilt GPU suite, $(date -Is), host $(hostname), budget ${BUDGET}s, results in $DEST"
STEPS=()

elapsed() { echo $(( $(date +%s) - START )); }

# step_timeout CAP: the step's time limit, CAP seconds or less if the deadline is nearer (15 s kept for packing)
step_timeout() {
    local left=$(( BUDGET - $(elapsed) - 15 ))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# budget_for CAP RESERVE: the benchmark's own --budget-s (start no new case after it), at least 5 s
budget_for() {
    local b=$(( $(step_timeout "$1") - $2 ))
    if [ "$b" -lt 5 ]; then echo 5; else echo "$b"; fi
}

# run NAME CAP LOGFILE CMD...: run CMD under timeout, its output to LOGFILE (in RAW) and to the screen
run() {
    local name=$1 cap=$2 log=$3; shift 3
    local t; t=$(step_timeout "$cap")
    if [ "$t" -lt 10 ]; then
        echo "=== $name: SKIPPED (deadline: $(elapsed)s of ${BUDGET}s spent)"
        STEPS+=("| $name | skipped (deadline) | 0 |")
        return 0
    fi
    echo "=== $name (limit ${t}s; $(elapsed)s spent): $*"
    local t0; t0=$(date +%s)
    set -o pipefail
    timeout --kill-after=5 "$t" "$@" 2>&1 | tee "$RAW/$log"
    local rc=$?
    set +o pipefail
    local dt=$(( $(date +%s) - t0 ))
    local what="rc $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && what="TIMED OUT after ${t}s (rc $rc)"
    echo "=== $name: $what in ${dt}s"
    STEPS+=("| $name | $what | $dt |")
    pack
    return 0
}

pack() {
    {
        echo "# hilt GPU suite — $(date -Is)"
        echo
        echo "Host $(hostname); $(elapsed)s of a ${BUDGET}s budget; command: \`bash benchmarks/gpu_suite.sh\`."
        echo
        echo "| step | result | seconds |"
        echo "|---|---|---|"
        printf '%s\n' "${STEPS[@]}"
        echo
        if [ -f "$RAW/info.txt" ]; then echo '```'; cat "$RAW/info.txt"; echo '```'; echo; fi
        if [ -f "$RAW/tests.log" ]; then echo "Tests (last lines of tests.log):"; echo; echo '```';
            tail -n 15 "$RAW/tests.log"; echo '```'; echo; fi
        for md in "$RAW"/results/attention_gpu_target.md "$RAW"/results/small_ops_gpu.md \
                  "$RAW"/results/models_gpu.md "$RAW"/results/attention_gpu_sweep.md; do
            [ -f "$md" ] && { cat "$md"; echo; }
        done
        true
    } > "$DEST/summary.md.tmp"
    mv -f "$DEST/summary.md.tmp" "$DEST/summary.md"
    cp -f "$DEST/summary.md" "$RAW/summary.md"
    for f in info.txt tests.log install.log; do [ -f "$RAW/$f" ] && cp -f "$RAW/$f" "$DEST/$f"; done
    tar -czf "$DEST/results.tar.gz.tmp" -C "$RAW" . && mv "$DEST/results.tar.gz.tmp" "$DEST/results.tar.gz"
}

mkdir -p "$RAW/results"
R="$RAW/results"

# 1. install (builds csrc/ with nvcc when it has kernels)
if [ "${SUITE_SKIP_INSTALL:-0}" = 1 ]; then
    echo "=== install: skipped (SUITE_SKIP_INSTALL=1)"; STEPS+=("| install | skipped | 0 |")
else
    run install 60 install.log $PY -m pip install --no-build-isolation --no-deps -e .
fi

# 2. versions, devices, backends
run info 20 info.txt $PY -m hilt.info
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu \
        --format=csv >> "$RAW/info.txt" 2>&1 || true
fi

# 3. tests (GPU tests run when CUDA is present; CPU-only ones too)
if [ "${SUITE_SKIP_TESTS:-0}" = 1 ]; then
    echo "=== tests: skipped (SUITE_SKIP_TESTS=1)"; STEPS+=("| tests | skipped | 0 |")
else
    # The GPU-relevant tests, GPU-only ones first (the whole suite does not fit the budget; the CPU-only
    # tests run in CI). SUITE_TEST_ARGS overrides the selection.
    # shellcheck disable=SC2086
    export HILT_TRITON_FIXED_CONFIG=1
    run tests 140 tests.log $PY -m pytest ${SUITE_TEST_ARGS:--q tests/ops/test_triton_gpu.py \
        tests/cuda/test_cuda_ops.py tests/ops --ignore=tests/ops/test_triton_configs.py \
        --ignore=tests/ops/test_triton_compile.py} -p no:cacheprovider -o timeout=90 --durations=10
    unset HILT_TRITON_FIXED_CONFIG
fi

# 4. block_local_attention at the target sizes, FIRST of the benchmarks (defaults on a GPU: B16 T4096 H16)
run bench_attention 100 bench_attention.log $PY benchmarks/bench_attention.py "${QUICK[@]}" --head-dims 64 \
    --dtypes "$( [ ${#QUICK[@]} = 0 ] && echo bf16 || echo fp32 )" --causal both \
    --budget-s "$(budget_for 100 30)" --out "$R" --tag attention_gpu_target

# 5. the other ops, then the models
run bench_small_ops 75 bench_small_ops.log $PY benchmarks/bench_small_ops.py "${QUICK[@]}" \
    --budget-s "$(budget_for 75 25)" --out "$R" --tag small_ops_gpu
run bench_models 35 bench_models.log $PY benchmarks/bench_models.py "${QUICK[@]}" \
    --budget-s "$(budget_for 35 15)" --out "$R" --tag models_gpu

# ---- CUDA launch-bounds A/B (issue 12) ------------------------------------------------------------------
# Default build vs HILT_CUDA_DEFINES="HILT_BLA_BWD_MIN_BLOCKS=2 HILT_APOOL_BWD_MIN_BLOCKS=2" (2 CTAs/SM for the
# bla / attention_pool backward kernels): builds both for this GPU's arch, times both backward kernels, compares
# their gradients; table in the log and results/cuda_launch_bounds_ab.md. Defaults change only on a measured gain.
if [ $(( BUDGET - $(elapsed) )) -ge 100 ]; then
    run cuda_launch_bounds_ab 120 cuda_launch_bounds_ab.log $PY -m hilt_kernels.cuda.ab_launch_bounds \
        --out "$R" --budget-s "$(budget_for 120 15)"
fi
# ---- end of the CUDA launch-bounds A/B -----------------------------------------------------------------------

# 6. with what is left: other head dims and fp16, fwd+bwd (no FlexAttention: it compiles per head dim)
if [ $(( BUDGET - $(elapsed) )) -ge 60 ]; then
    run bench_attention_sweep 90 bench_attention_sweep.log $PY benchmarks/bench_attention.py "${QUICK[@]}" \
        --head-dims 32 128 --dtypes "$( [ ${#QUICK[@]} = 0 ] && echo bf16 fp16 || echo fp32 )" --causal true \
        --modes fwd+bwd --no-flex --no-plot --budget-s "$(budget_for 90 30)" --out "$R" \
        --tag attention_gpu_sweep
fi

pack
rm -rf "$RAW"
echo
echo "=== done in $(elapsed)s; files in $DEST:"
ls -la "$DEST"
echo
cat "$DEST/summary.md"
sleep 1  # let tee finish writing suite.log before the command returns
