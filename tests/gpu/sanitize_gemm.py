"""Small calls that reach every CUDA kernel variant of the 4-bit matmul ops,
for compute-sanitizer (memcheck/racecheck): fused forward with each m-tile
count, chunk width, plain and nested scales, split and unsplit reductions,
the transposed GEMV, the transposed tensor-core kernel (odd N too), and the
dequantize + cuBLAS paths. LOWBIT_GEMM_T_PATH=tc sends every backward call
the tensor-core kernel can take to it."""
import torch

from lowbit import functional as F
from lowbit import ops

torch.manual_seed(0)
calls = 0
for (N, K, bs) in [(37, 512, 32), (200, 768, 64), (24, 1024, 256), (4100, 256, 64), (300, 768, 128),
                   (45, 640, 64)]:
    for dq in (False, True):
        w = torch.randn(N, K, device="cuda") * 0.05
        packed, st = F.quantize_4bit(w, blocksize=bs, double_quant=dq)
        for dtype in (torch.bfloat16, torch.float16):
            b = torch.randn(N, device="cuda", dtype=dtype)
            for M in (1, 3, 5, 9, 17, 33, 100, 200):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                F.matmul_4bit(x, packed, st, b)
                g = torch.randn(M, N, device="cuda", dtype=dtype)
                ops.gemm_4bit_t(g, packed, *st.quant_args()[:3], N, K, *st.quant_args()[3:])
                calls += 2
torch.cuda.synchronize()
print(f"sanitize cases: {calls} calls done")
