"""Correctness of the decode GEMV (gemm_4bit with M <= 8) for every kernel
variant, on a CUDA machine.

The variant is chosen by LOWBIT_GEMV_VARIANT, which the extension reads once
per process, so each variant runs in a subprocess of this script:

  python tests/gpu/gemv_check.py                 # async, regs, lut256 and tc
  python tests/gpu/gemv_check.py --variants async --quick
  python tests/gpu/gemv_check.py --variants async --ms 9,12,16,17,24,31,32   # the small-M kernel
  python tests/gpu/gemv_check.py --variants async --ms 33,40,47,48,63,64     # ... once per half of the rows

For M in 1..8, N in {1, 7, 4096, 4097, 11008, 28672}, K in {256, 640, 4096,
11008, 8192} (640: not a multiple of 256, the dequantize + cuBLAS path),
blocksizes {64, 128, 256, 4096}, nf4 and fp4, nested and plain scales, bf16
and fp16, with and without bias, gemm_4bit is compared with a reference
(dequantize in float32, multiply in float64). The rule: its error (norm over
the output) is at most twice that of "dequantize to x's dtype, then torch
matmul", plus a tiny slack (1e-6 of the reference norm and half an ulp of the
output dtype at the reference's rms). The output must hold no NaN/inf (freed
memory is filled with 0xFF first, so unwritten elements read as NaN) and two
calls must agree bitwise (deterministic reduction). Prints PASS/FAIL lines;
exits non-zero on any failure.
"""
import argparse
import itertools
import os
import subprocess
import sys

VARIANTS = ["async", "regs", "lut256", "tc"]
MS = list(range(1, 9))
NS = [1, 7, 4096, 4097, 11008, 28672]
KS = [256, 640, 4096, 11008, 8192]
BLOCKSIZES = [64, 128, 256, 4096]
QUICK_NS = [1, 7, 4097]
QUICK_KS = [256, 640, 4096]


def poison(nbytes=256 << 20):
    import torch

    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t.fill_(0xFF)
    del t


def worker(variant, quick, ms=MS):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
    from lowbit import functional as F

    torch.manual_seed(1234)
    ns, ks = (QUICK_NS, QUICK_KS) if quick else (NS, KS)
    fails = 0
    lines = 0
    for N, K, bs, qt, dq in itertools.product(ns, ks, BLOCKSIZES, ["nf4", "fp4"], [True, False]):
        w = torch.randn(N, K, device="cuda") * 0.05
        packed, st = F.quantize_4bit(w, blocksize=bs, quant_type=qt, double_quant=dq)
        del w
        W32 = F.dequantize_4bit(packed, st, torch.float32)
        for dtype, with_bias in itertools.product([torch.bfloat16, torch.float16], [False, True]):
            x_all = torch.randn(max(ms), K, device="cuda").to(dtype)
            bias = torch.randn(N, device="cuda").to(dtype) if with_bias else None
            ref_all = x_all.double() @ W32.double().t()
            if bias is not None:
                ref_all += bias.double()
            Wd = F.dequantize_4bit(packed, st, dtype)
            base_all = x_all @ Wd.t()
            if bias is not None:
                base_all = base_all + bias
            del Wd
            eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
            bad = []
            worst = 0.0
            for M in ms:
                x = x_all[:M]
                poison()
                out1 = F.matmul_4bit(x, packed, st, bias)
                poison()
                out2 = F.matmul_4bit(x, packed, st, bias)
                ref, base = ref_all[:M], base_all[:M]
                if out1.shape != (M, N) or out1.dtype != dtype:
                    bad.append(f"M={M}: shape {tuple(out1.shape)} dtype {out1.dtype}")
                    continue
                if not torch.isfinite(out1).all():
                    bad.append(f"M={M}: non-finite output (unwritten elements?)")
                    continue
                if not torch.equal(out1, out2):
                    bad.append(f"M={M}: two calls differ (non-deterministic)")
                    continue
                err = (out1.double() - ref).norm().item()
                err_base = (base.double() - ref).norm().item()
                rn = ref.norm().item()
                # Noise floor: with few outputs (N = 1) "2 x the baseline's
                # error" compares two random draws. Each product carries one
                # rounding of about eps/2 of its size, in both computations
                # independently, so the expected error norm is about
                # eps/2 * ||sqrt(sum_k (x_k w_k)^2)||, and its relative spread
                # shrinks as 1/sqrt(outputs): three spreads of slack, which
                # vanish for large outputs (where the 2x rule alone decides).
                terms = ((x.double() ** 2) @ (W32.double() ** 2).t()).sqrt().norm().item()
                n_out = max(ref.numel(), 1)
                slack = 1e-6 * rn + 0.5 * eps * rn / n_out ** 0.5 + 1.5 * eps * terms / n_out ** 0.5
                limit = 2 * err_base + slack
                worst = max(worst, err / limit if limit > 0 else 0.0)
                if not err <= limit:
                    bad.append(f"M={M}: error {err:.3e} > 2 x {err_base:.3e} + {slack:.1e}")
            what = (f"{variant} N={N} K={K} bs={bs} {qt} {'nested' if dq else 'plain'} "
                    f"{str(dtype).replace('torch.', '')} bias={int(with_bias)}")
            lines += 1
            if bad:
                fails += 1
                print(f"FAIL {what}: " + "; ".join(bad), flush=True)
            else:
                print(f"PASS {what} M={','.join(map(str, ms))} (worst error / limit {worst:.2f})", flush=True)
        del packed, st, W32
        torch.cuda.empty_cache()
    print(f"{variant}: {lines - fails} passed, {fails} failed", flush=True)
    return 1 if fails else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="small N and K only")
    ap.add_argument("--ms", default=",".join(map(str, MS)),
                    help="rows of x (default 1-8, the GEMV; 9-64 run the small-M kernel whatever the variant)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker(args.worker, args.quick, [int(m) for m in args.ms.split(",")]))
    status = 0
    for v in args.variants.split(","):
        env = dict(os.environ, LOWBIT_GEMV_VARIANT=v)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--ms", args.ms] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd, env=env)
        print(f"== variant {v}: {'PASS' if rc == 0 else 'FAIL'} (exit {rc})", flush=True)
        status |= rc != 0
    sys.exit(status)


if __name__ == "__main__":
    main()
