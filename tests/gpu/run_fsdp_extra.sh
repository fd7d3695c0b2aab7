#!/usr/bin/env bash
# FSDP2 on 2 GPUs, the parts beyond tests/gpu/fsdp_2gpu.py's first checks:
#   check  tests/gpu/fsdp_2gpu.py: sharded training against one GPU, then the same
#          with FSDP2 CPU offload (shard_model(cpu_offload=True)) against the
#          non-offloaded 20-step loss curve and checkpoint. ~1 min.
#   bench  benchmarks/bench_fsdp.py: Llama-2-7B shapes, 2 x 2048 tokens per GPU, on 1 and
#          2 GPUs: lowbit, bitsandbytes + PEFT (when they import), lowbit with CPU
#          offload. Each configuration in its own process group with a time limit
#          (BENCH_TIMEOUT s, default 180); a failure becomes a row's status. ~4-6 min.
# Usage: bash tests/gpu/run_fsdp_extra.sh [check|bench|all]   (default all)
# Output: $OUT (default ./fsdp-extra-out): versions.txt, fsdp_2gpu.log (+ JSON per
# rank), bench_fsdp.log, bench_fsdp.json, bench/ (per configuration: torchrun log,
# per-step JSON lines, per-rank results). Needs the CUDA build of the extension
# (python/lowbit/_C*.so); without it the script builds it in place first.
# TINY=1 runs the bench part on the CPU with tiny shapes instead (the script's own check).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-fsdp-extra-out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
# NVLink multicast off for NCCL, torch's symmetric memory and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
status=0

tiny=()
if [ -n "${TINY:-}" ]; then
  tiny=(--tiny)
  [ "$what" = all ] && what=bench
elif ! python3 -c "import lowbit._build_info as b, sys; sys.exit(0 if b.WITH_CUDA else 1)" 2>/dev/null; then
  echo "== build (no CUDA build of the extension found)"
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
{
  [ -n "${TINY:-}" ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m lowbit | sed -n 1,5p
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import bitsandbytes, peft; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
} | tee "$OUT/versions.txt"

if [ "$what" = check ] || [ "$what" = all ]; then
  echo "== tests/gpu/fsdp_2gpu.py (sharded vs one GPU; CPU offload vs not)"
  timeout -k 20 420 python3 -m torch.distributed.run --standalone --nproc_per_node 2 tests/gpu/fsdp_2gpu.py \
    --out "$OUT/fsdp_2gpu" > "$OUT/fsdp_2gpu.log" 2>&1
  rc=$?
  grep -E "^rank [01]: |^  " "$OUT/fsdp_2gpu.log" || tail -30 "$OUT/fsdp_2gpu.log"
  [ $rc -eq 0 ] || { echo "fsdp_2gpu.py exited with $rc (124: timed out)"; status=1; }
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
  echo "== benchmarks/bench_fsdp.py"
  python3 benchmarks/bench_fsdp.py --out "$OUT/bench" --impl auto --gpus 1,2 --cpu-offload --steps 4 --warmup 2 \
    --timeout "${BENCH_TIMEOUT:-180}" "${tiny[@]}" --json "$OUT/bench_fsdp.json" > "$OUT/bench_fsdp.log" 2>&1 || status=1
  grep -E "^  [a-z]|^\||^[a-z_0-9]+: |^note: " "$OUT/bench_fsdp.log" || tail -30 "$OUT/bench_fsdp.log"
fi
exit $status
