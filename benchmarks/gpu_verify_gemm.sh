#!/bin/bash
# Build, test, sanitize and time the 4-bit matmul on a CUDA machine. Logs go
# to ${OUT:-/tmp/gemm_out}. Usage: bash benchmarks/gpu_verify_gemm.sh [--quick]
set -o pipefail
OUT=${OUT:-/tmp/gemm_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/smi.txt" 2>&1
echo "commit $(cat .commit 2>/dev/null || git rev-parse --short HEAD)" >> "$OUT/smi.txt"
time MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -X faulthandler -m pytest -v tests/test_gemm.py -k "test_errors" 2>&1 | tee "$OUT/tests_errors.log" | tail -4
# The graph-capture tests in a process of their own, so one failure cannot hide the rest.
$PY -X faulthandler -m pytest -v tests/test_gemm.py -k "not graph_capture" 2>&1 | tee "$OUT/tests.log" | grep -E "FAIL|Error|passed|failed|Fatal|test_gemm.py::" | grep -v PASSED | tail -15
$PY -X faulthandler -m pytest -v tests/test_gemm.py -k "graph_capture" 2>&1 | tee "$OUT/tests_graph.log" | tail -8
# The backward's tensor-core kernel for every M the tests use (M = 1 and M > 32 included).
LOWBIT_GEMM_T_PATH=tc $PY -X faulthandler -m pytest -q tests/test_gemm.py -k "backward or graph or bitsandbytes" 2>&1 \
  | tee "$OUT/tests_gemm_t_tc.log" | tail -2
# The same with the other plan shapes: four warps along K, M > 32 as passes of 4 m-tiles.
LOWBIT_GEMM_T_PATH=tc LOWBIT_GEMM_T_MAXMT=4 LOWBIT_GEMM_T_CW=4 $PY -X faulthandler -m pytest -q tests/test_gemm.py \
  -k "backward or graph or bitsandbytes" 2>&1 | tee "$OUT/tests_gemm_t_tc_mt4_cw4.log" | tail -2
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --print-limit 20 $PY tests/gpu/sanitize_gemm.py > "$OUT/$tool.log" 2>&1
  echo "$tool: $(tail -2 "$OUT/$tool.log" | tr '\n' ' ')"
  LOWBIT_GEMM_T_PATH=tc timeout 150 compute-sanitizer --tool $tool --print-limit 20 $PY tests/gpu/sanitize_gemm.py \
    > "$OUT/${tool}_tc.log" 2>&1
  echo "$tool (backward forced onto the tensor-core kernel): $(tail -2 "$OUT/${tool}_tc.log" | tr '\n' ' ')"
done
$PY benchmarks/bench_gemm.py "$@" --json "$OUT/bench.json" --png "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"
