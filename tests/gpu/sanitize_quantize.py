"""Drives every quantize-family CUDA kernel on small, odd and unaligned inputs,
for compute-sanitizer (memcheck, racecheck, initcheck). Checks results too, so
a run that finds nothing also proves the kernels ran."""
import torch

from lowbit import functional as F
from lowbit import ops


def main():
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for n in (7, 3 * bs + 1, 5000):
                for qt in ("nf4", "fp4"):
                    x = torch.randn(n, device=dev, dtype=dtype)
                    p, st = F.quantize_4bit(x, bs, qt, double_quant=True)
                    pc, sc = F.quantize_4bit(x.cpu(), bs, qt, double_quant=True)
                    assert torch.equal(p.cpu(), pc) and torch.equal(st.absmax.cpu(), sc.absmax)
                    out = F.dequantize_4bit(p, st)
                    assert torch.equal(out.cpu(), F.dequantize_4bit(pc, sc))
                    # unaligned views of input and packed codes
                    buf = torch.randn(n + 1, device=dev, dtype=dtype)
                    p2, a2 = ops.quantize_4bit(buf[1:], bs, qt)
                    ub = torch.empty(p2.numel() + 1, dtype=torch.uint8, device=dev)
                    ub[1:] = p2.view(-1)
                    ops.dequantize_4bit(ub[1:], a2, st.code, bs, (n,), dtype)
        q, am = ops.quantize_8bit_blockwise(torch.randn(70001, device=dev, dtype=dtype), F.get_dynamic_map(True, dev), 256)
        ops.dequantize_8bit_blockwise(q, am, F.get_dynamic_map(True, dev), 256, dtype)
    torch.cuda.synchronize()
    print("sanitize_quantize: all kernels ran and matched the CPU")


if __name__ == "__main__":
    main()
