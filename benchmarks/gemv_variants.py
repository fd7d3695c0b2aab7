"""Decode GEMV kernel variants (gemm_4bit at M = 1..8) side by side.

Each variant (LOWBIT_GEMV_VARIANT, read once per process) runs in its own
subprocess on the same card: nf4, blocksize 64, double-quantized scales, bf16.
Per shape (N x K) and M: the median over >= 50 timed replays of a CUDA graph
of `calls` consecutive calls (host launch overhead out of the figure), each
call on the next of several weight copies (packed codes and scales), enough
copies that they exceed twice the L2 cache, so the weight comes from HBM.
Beside each figure: the ideal, (packed + scale bytes) / the device-to-device
copy bandwidth measured in the same process (read + write bytes per second).

  python benchmarks/gemv_variants.py [--variants async,regs,lut256,tc] [--quick] [--json out.json]
"""
import argparse
import json
import math
import os
import subprocess
import sys

VARIANTS = ["async", "regs", "lut256", "tc"]
SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (14336, 4096), (28672, 8192), (8192, 28672)]
QUICK_SHAPES = [(4096, 11008), (28672, 8192)]
MS = [1, 2, 4, 8]


def worker(variant, shapes, reps, ms=MS):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import copy_bandwidth_gbs, graph_ms, median_ms
    from lowbit import functional as F
    from lowbit import ops

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth_gbs() * 1e9  # bytes/s, read + write
    l2 = props.L2_cache_size
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        del w
        wbytes = packed.numel() + st.absmax.numel() + 4 * st.nested_absmax.numel()
        ncopies = max(2, math.ceil(2 * max(l2, 50 << 20) / wbytes))
        copies = [(packed.clone(), st.absmax.clone()) for _ in range(ncopies)]
        calls = max(ncopies, 20)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

            def fn(copy, x=x, st=st):
                p, am = copy
                return ops.gemm_4bit(x, p, am, st.code, st.blocksize, N, K, st.nested_absmax, st.nested_code,
                                     st.offset, st.nested_blocksize, None)

            t_ms, mode = graph_ms(fn, copies, calls=calls, reps=reps), "graph"
            if t_ms is None:  # not capturable: eager calls, launch overhead included
                t_ms, mode = median_ms(fn, copies, warmup=3, reps=reps), "eager"
            t = t_ms * 1e-3
            ideal = wbytes / bw
            rows.append(dict(variant=variant, N=N, K=K, M=M, us=t * 1e6, ideal_us=ideal * 1e6,
                             pct_of_ideal=100.0 * ideal / t, weight_bytes=wbytes, copies=ncopies, timing=mode))
        del copies, packed, st
        torch.cuda.empty_cache()
    return dict(device=f"{props.name} ({props.multi_processor_count} SMs)", copy_bw_GBs=bw / 1e9,
                torch=torch.__version__, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x (comma-separated)")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES} only")
    ap.add_argument("--reps", type=int, default=50, help="timed graph replays per point (>= 50)")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.worker:
        res = worker(args.worker, shapes, max(args.reps, 50), [int(m) for m in args.ms.split(",")])
        with open(args.out, "w") as f:
            json.dump(res, f)
        return
    results = {}
    for v in args.variants.split(","):
        out = f"/tmp/gemv_variants_{os.getpid()}_{v}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--out", out, "--reps", str(args.reps)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--ms", args.ms]
        rc = subprocess.call(cmd, env=dict(os.environ, LOWBIT_GEMV_VARIANT=v))
        if rc != 0:
            print(f"variant {v}: worker failed (exit {rc})", file=sys.stderr)
            continue
        with open(out) as f:
            results[v] = json.load(f)
        os.remove(out)
    if not results:
        sys.exit(1)
    first = next(iter(results.values()))
    print(f"device: {first['device']}; torch {first['torch']}")
    for v, r in results.items():
        print(f"copy bandwidth in the {v} run: {r['copy_bw_GBs']:.0f} GB/s (read + write)")
    variants = list(results)
    print()
    head = f"{'N x K':>12} {'M':>2} {'ideal us':>9} " + " ".join(f"{v + ' us':>10} {'%':>4}" for v in variants)
    print(head)
    by = {v: {(r["N"], r["K"], r["M"]): r for r in results[v]["rows"]} for v in variants}
    for key in sorted(by[variants[0]], key=lambda k: (shapes.index((k[0], k[1])), k[2])):
        N, K, M = key
        ideal = by[variants[0]][key]["ideal_us"]
        cells = []
        for v in variants:
            r = by[v].get(key)
            cells.append(f"{r['us']:10.2f} {r['pct_of_ideal']:4.0f}" if r else f"{'-':>10} {'':>4}")
        print(f"{N:>5}x{K:<6} {M:>2} {ideal:9.2f} " + " ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
