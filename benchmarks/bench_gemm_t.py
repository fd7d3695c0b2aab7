"""The backward 4-bit matmul alone (grad_x = g @ dequant(W), `gemm_4bit_t`),
path by path, beside bf16 `g @ W` (cuBLAS).

The CUDA op picks its path from M (rows of g); LOWBIT_GEMM_T_PATH pins one:
  auto     the default dispatch
  gemv     the transposed GEMV for M <= 4, dequantize + cuBLAS above
  tc       the transposed tensor-core kernel wherever it applies
  dequant  dequantize + cuBLAS always
The variable is read once per process, so each path runs in its own
subprocess. Each figure is the device time per call of a CUDA graph of calls
rotating over several weight copies (weights come from HBM, not L2), median
of repeats; beside it the ideal: (packed + scale + g + out bytes) / measured
copy bandwidth.

  python benchmarks/bench_gemm_t.py [--shapes 4096x11008,...] [--ms 1,8,32]
      [--paths auto,tc,dequant] [--cw 0] [--pf 0] [--max-mt 8] [--json out.json]

--cw, --pf and --max-mt override the tensor-core kernel's planner
(LOWBIT_GEMM_T_CW: warps side by side along K; LOWBIT_GEMM_T_PF: an L2
prefetch distance in steps, none by default; LOWBIT_GEMM_T_MAXMT: 4 runs
M = 33..64 as two passes of 4 m-tiles instead of one of 8) in every path's
process.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copies_for, copy_bandwidth_gbs, graph_ms  # noqa: E402

DEFAULT_SHAPES = "4096x11008,11008x4096,28672x8192"
DEFAULT_MS = "1,2,4,5,8,16,32,64,128"


def worker(shapes, ms, with_bf16):
    from lowbit import functional as F
    from lowbit import ops

    torch.manual_seed(0)
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        wbytes = packed.numel() + st.absmax.numel() * st.absmax.element_size()
        copies = copies_for(wbytes)
        qs = [(packed.clone(), st) for _ in range(copies)]
        wb = [w.clone() for _ in range(copies_for(w.numel() * 2))] if with_bf16 else []
        qa = st.quant_args()
        for M in ms:
            g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            t = graph_ms(lambda q: ops.gemm_4bit_t(g, q[0], *qa[:3], N, K, *qa[3:]), qs)
            row = {"N": N, "K": K, "M": M, "us": t * 1e3 if t is not None else None,
                   "bytes": wbytes + 2 * M * (N + K)}
            if with_bf16:
                tb = graph_ms(lambda ww: g @ ww, wb)
                row["bf16_us"] = tb * 1e3 if tb is not None else None
            rows.append(row)
        del qs, wb, w
        torch.cuda.empty_cache()
    print("ROWS " + json.dumps(rows), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="N x K list, e.g. 4096x11008,28672x8192")
    ap.add_argument("--ms", default=DEFAULT_MS)
    ap.add_argument("--paths", default="auto,tc,dequant")
    ap.add_argument("--cw", type=int, default=0, help="the tensor-core kernel's warps along K (0: its default)")
    ap.add_argument("--pf", type=int, default=0,
                    help="the tensor-core kernel's L2 prefetch distance in steps (0: none, its default)")
    ap.add_argument("--max-mt", type=int, default=8, choices=(4, 8),
                    help="the tensor-core kernel's largest m-tile count (8: its default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if args.worker is not None:
        worker(shapes, ms, args.bf16)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_t: needs a CUDA device")
    bw = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {bw / 1e3:.2f} TB/s; torch {torch.__version__}")
    paths = args.paths.split(",")
    results = {}
    for i, path in enumerate(paths):
        env = dict(os.environ, LOWBIT_GEMM_T_PATH=path)
        if args.cw:
            env["LOWBIT_GEMM_T_CW"] = str(args.cw)
        if args.pf > 0:
            env["LOWBIT_GEMM_T_PF"] = str(args.pf)
        if args.max_mt != 8:
            env["LOWBIT_GEMM_T_MAXMT"] = str(args.max_mt)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--shapes", args.shapes, "--ms", args.ms]
        if i == 0:
            cmd.append("--bf16")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
        if out.returncode != 0 or not line:
            sys.exit(f"bench_gemm_t: path {path} failed:\n{out.stdout}\n{out.stderr}")
        results[path] = json.loads(line[0][5:])
    base = results[paths[0]]
    hdr = "       N x K     M | " + " ".join(f"{p:>8}" for p in paths) + "     bf16   ideal"
    print("times in us per call (median of graph replays); ideal = bytes / copy bandwidth")
    print(hdr)
    table = []
    for r, row in enumerate(base):
        ideal = row["bytes"] / (bw * 1e9) * 1e6
        vals = [results[p][r]["us"] for p in paths]
        cells = " ".join(f"{v:8.1f}" if v is not None else "       -" for v in vals)
        bf = row.get("bf16_us")
        print(f"  {row['N']:>5}x{row['K']:<5} {row['M']:>4} | {cells} {bf if bf is None else round(bf, 1):>8} {ideal:7.1f}")
        table.append({"N": row["N"], "K": row["K"], "M": row["M"], "ideal_us": ideal, "bf16_us": bf,
                      **{f"{p}_us": v for p, v in zip(paths, vals)}})
    if args.json:
        with open(args.json, "w") as f:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
            json.dump({"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
                       "commit": commit, "torch": torch.__version__, "copy_bw_gbs": bw, "cw": args.cw, "pf": args.pf,
                       "paths": paths, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
