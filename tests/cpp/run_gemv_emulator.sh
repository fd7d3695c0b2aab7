#!/bin/bash
# Builds and runs the host emulation of the decode GEMV kernel and the
# transposed tensor-core kernel (tests/cpp/gemv_emulator.cu); needs nvcc and
# torch's headers, no GPU.
# Usage: bash tests/cpp/run_gemv_emulator.sh [--quick]   (both kernels)
#        bash tests/cpp/run_gemv_emulator.sh --tt [--quick]   (the transposed one only)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TORCH_INC=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
OUT=${GEMV_EMU_BIN:-/tmp/lowbit_gemv_emulator}
nvcc -std=c++17 -O1 -Icsrc $TORCH_INC -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -o "$OUT" tests/cpp/gemv_emulator.cu
"$OUT" "$@"
