#!/usr/bin/env bash
# GPU check of the whole package on a CUDA machine: build in place, the test
# suite, compute-sanitizer over the kernels, and the benchmarks. Logs go to
# $LOG_DIR (default ./gpu-logs). Usage: bash tests/gpu/run_all.sh [pytest args]
set -uo pipefail
LOG_DIR=${LOG_DIR:-gpu-logs}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $1"; }

step build
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 setup.py build_ext --inplace \
  > "$LOG_DIR/build.log" 2>&1 || { tail -40 "$LOG_DIR/build.log"; exit 1; }
PYTHONPATH="python:${PYTHONPATH:-}" python3 -m lowbit | tee "$LOG_DIR/info.log"

step pytest
python3 -m pytest -q -rs "${@:-tests}" 2>&1 | tee "$LOG_DIR/pytest.log" | tail -25 || status=1

if [ -z "${SKIP_SANITIZER:-}" ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    step "compute-sanitizer $tool"
    for script in tests/gpu/sanitize_*.py; do
      PYTHONPATH="python:${PYTHONPATH:-}" compute-sanitizer --tool "$tool" --error-exitcode 9 python3 "$script" \
        > "$LOG_DIR/sanitizer-$tool-$(basename "$script" .py).log" 2>&1
      rc=$?
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|matched" "$LOG_DIR/sanitizer-$tool-$(basename "$script" .py).log" | sed "s/^/$tool $(basename "$script"): /"
      [ $rc -eq 0 ] || status=1
    done
  done
fi

step "backward: the transposed tensor-core kernel for every M (LOWBIT_GEMM_T_PATH=tc)"
LOWBIT_GEMM_T_PATH=tc python3 -m pytest -q tests/test_gemm.py -k "backward or graph or bitsandbytes or compile or opcheck or stream" \
  2>&1 | tee "$LOG_DIR/pytest-gemm-t-tc.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -z "${SKIP_SANITIZER:-}" ]; then
  for tool in memcheck racecheck; do
    LOWBIT_GEMM_T_PATH=tc PYTHONPATH="python:${PYTHONPATH:-}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 tests/gpu/sanitize_gemm.py > "$LOG_DIR/sanitizer-$tool-gemm-t-tc.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG_DIR/sanitizer-$tool-gemm-t-tc.log" | sed "s/^/$tool sanitize_gemm (tc): /"
  done
fi

step "backward: the same with four warps along K and M > 32 as passes of 4 m-tiles"
LOWBIT_GEMM_T_PATH=tc LOWBIT_GEMM_T_MAXMT=4 LOWBIT_GEMM_T_CW=4 python3 -m pytest -q tests/test_gemm.py \
  -k "backward or graph or bitsandbytes or compile or opcheck or stream" 2>&1 | tee "$LOG_DIR/pytest-gemm-t-tc-mt4-cw4.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -z "${SKIP_SANITIZER:-}" ]; then
  LOWBIT_GEMM_T_PATH=tc LOWBIT_GEMM_T_MAXMT=4 LOWBIT_GEMM_T_CW=4 PYTHONPATH="python:${PYTHONPATH:-}" \
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/gpu/sanitize_gemm.py \
    > "$LOG_DIR/sanitizer-memcheck-gemm-t-tc-mt4-cw4.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY" "$LOG_DIR/sanitizer-memcheck-gemm-t-tc-mt4-cw4.log" | sed "s/^/memcheck sanitize_gemm (tc, mt4, cw4): /"
fi

step "decode GEMV check (every variant)"
PYTHONPATH="python:${PYTHONPATH:-}" python3 tests/gpu/gemv_check.py 2>&1 | tee "$LOG_DIR/gemv_check.log" | grep -E "^== |^FAIL" | head -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "adam host check"
PYTHONPATH="python:${PYTHONPATH:-}" python3 tests/gpu/adam_host_check.py 2>&1 | tee "$LOG_DIR/adam_host_check.log" | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "optimizer square root check (all non-negative floats)"
TORCH_INC=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
nvcc -std=c++17 -O3 -arch=native -Icsrc $TORCH_INC -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
  tests/gpu/sqrt_check.cu -o "$LOG_DIR/sqrt_check" && "$LOG_DIR/sqrt_check" | tee "$LOG_DIR/sqrt_check.log" || status=1

if [ -n "${BENCH_MODE:-}" ]; then
  step "benchmarks ($BENCH_MODE)"
  PYTHONPATH="python:${PYTHONPATH:-}" python3 benchmarks/bench.py --mode "$BENCH_MODE" --json "$LOG_DIR/bench.json" 2>&1 | tee "$LOG_DIR/bench.log" || status=1
fi
exit $status
