"""4-bit matmul speed: lowbit vs bf16 F.linear (cuBLAS) vs bitsandbytes.

For Llama shapes (N x K = out x in features) and token counts M, times the
forward (x @ W^T) and forward + backward for x (grad_out @ W) of each
implementation, in the same run. Each timed region is a CUDA graph of R calls
that rotate over several weight copies (so the weight is read from HBM, not
L2, and host launch overhead is out of the figure); medians over repeats,
after warm-up. Beside each figure: the ideal, max(bytes / measured copy
bandwidth, FLOPs / measured bf16 matmul rate).

  python benchmarks/bench_gemm.py [--quick] [--json out.json] [--png out.png]
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch

import lowbit
from lowbit import functional as LF
from lowbit import ops as lops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192), (8192, 28672)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]
QUICK_SHAPES = [(11008, 4096), (4096, 11008), (28672, 8192)]
QUICK_MS = [1, 8, 32, 64, 128, 512, 4096]
L2_ROTATE_BYTES = 256 << 20  # > 5x the H100's 50 MB L2


def measure_copy_bw():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    del a, b
    return 2 * n / statistics.median(ts)


def measure_mm_rate():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    return 2 * n**3 / statistics.median(ts)


def time_graph(fn_list, reps=15, warm=3):
    """Median time per call of the callables in fn_list (called round-robin),
    captured in one CUDA graph; falls back to eager timing if capture fails."""
    calls = len(fn_list)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    runner = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fn_list:
                f()
        runner = g.replay
    except Exception:  # not capturable: eager, launch overhead included
        torch.cuda.synchronize()

        def runner():
            for f in fn_list:
                f()

    for _ in range(warm):
        runner()
    ts = []
    for _ in range(reps):
        st, en = torch.cuda.Event(True), torch.cuda.Event(True)
        st.record()
        runner()
        en.record()
        en.synchronize()
        ts.append(st.elapsed_time(en) * 1e-3 / calls)
    return statistics.median(ts)


def copies_for(nbytes, cap=8):
    return max(2, min(cap, math.ceil(L2_ROTATE_BYTES / max(nbytes, 1))))


def try_import_bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
        from bitsandbytes.functional import QuantState as BnbState  # noqa: F401

        return bnb
    except Exception:
        return None


def bnb_state(state, dtype):
    from bitsandbytes.functional import QuantState as BnbState

    state2 = None
    if state.nested:
        state2 = BnbState(absmax=state.nested_absmax, code=state.nested_code, blocksize=state.nested_blocksize,
                          dtype=torch.float32)
    return BnbState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                    quant_type=state.quant_type, dtype=dtype, offset=state.offset, state2=state2)


def bench_shape(N, K, Ms, bw, rate, bnb, do_bwd=True):
    dtype = torch.bfloat16
    rows = []
    w = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
    packed, state = LF.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    q_bytes = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel()
    nq = copies_for(q_bytes)
    q_copies = [(packed.clone(), state) for _ in range(nq)]
    nb = copies_for(w.numel() * 2, cap=4)
    w_copies = [w.clone() for _ in range(nb)]
    del w
    bnb_states = [bnb_state(state, dtype) for _ in range(nq)] if bnb is not None else None
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        gout = torch.randn(M, N, device="cuda", dtype=dtype)
        flops = 2.0 * M * N * K
        act = 2 * (M * K + M * N)
        ideal_q = max((q_bytes + act) / bw, flops / rate)
        ideal_b = max((2 * N * K + act) / bw, flops / rate)
        r = dict(N=N, K=K, M=M, ideal_4bit_us=ideal_q * 1e6, ideal_bf16_us=ideal_b * 1e6)

        def lb_f(p, st):
            return lambda: LF.matmul_4bit(x, p, st)

        def lb_fb(p, st):
            def f():
                LF.matmul_4bit(x, p, st)
                lops.gemm_4bit_t(gout, p, st.absmax, st.code, st.blocksize, N, K, st.nested_absmax, st.nested_code,
                                 st.offset, st.nested_blocksize)
            return f

        def bf_f(wc):
            return lambda: torch.nn.functional.linear(x, wc)

        def bf_fb(wc):
            def f():
                torch.nn.functional.linear(x, wc)
                torch.mm(gout, wc)
            return f

        r["lowbit_fwd_us"] = time_graph([lb_f(p, st) for p, st in q_copies]) * 1e6
        r["bf16_fwd_us"] = time_graph([bf_f(wc) for wc in w_copies]) * 1e6
        if do_bwd:
            r["lowbit_fwdbwd_us"] = time_graph([lb_fb(p, st) for p, st in q_copies]) * 1e6
            r["bf16_fwdbwd_us"] = time_graph([bf_fb(wc) for wc in w_copies]) * 1e6
        if bnb is not None:
            try:
                r["bnb_fwd_us"] = time_graph(
                    [(lambda p=p, qs=qs: bnb.matmul_4bit(x, p.t(), quant_state=qs))
                     for (p, _), qs in zip(q_copies, bnb_states)]) * 1e6
            except Exception as e:
                print(f"bnb failed at {N}x{K} M={M}: {e}", file=sys.stderr)
        r["lowbit_fwd_pct_of_ideal"] = 100 * r["ideal_4bit_us"] / r["lowbit_fwd_us"]
        rows.append(r)
        print_row(r)
        sys.stdout.flush()
    return rows


HEADER = (f"{'N x K':>12} {'M':>5} | {'lowbit':>9} {'bf16':>9} {'bnb':>9} {'ideal4':>8} {'%ideal':>6} | "
          f"{'lb f+b':>9} {'bf16 f+b':>9} {'ratio':>6}")


def print_row(r):
    def f(k):
        v = r.get(k)
        return f"{v:9.1f}" if v is not None else f"{'-':>9}"

    ratio = r["lowbit_fwdbwd_us"] / r["bf16_fwdbwd_us"] if "lowbit_fwdbwd_us" in r else float("nan")
    print(f"{str(r['N']) + 'x' + str(r['K']):>12} {r['M']:>5} | {f('lowbit_fwd_us')} {f('bf16_fwd_us')} "
          f"{f('bnb_fwd_us')} {r['ideal_4bit_us']:8.1f} {r['lowbit_fwd_pct_of_ideal']:6.0f} | "
          f"{f('lowbit_fwdbwd_us')} {f('bf16_fwdbwd_us')} {ratio:6.3f}")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(shapes) / cols), cols, figsize=(5 * cols, 4 * math.ceil(len(shapes) / cols)),
                             squeeze=False)
    for ax, (N, K) in zip(axes.flat, shapes):
        rs = [r for r in rows if (r["N"], r["K"]) == (N, K)]
        Ms = [r["M"] for r in rs]
        for key, label in [("lowbit_fwd_us", "lowbit"), ("bf16_fwd_us", "bf16 F.linear"), ("bnb_fwd_us", "bnb"),
                           ("ideal_4bit_us", "ideal 4-bit"), ("lowbit_fwdbwd_us", "lowbit fwd+bwd"),
                           ("bf16_fwdbwd_us", "bf16 fwd+bwd")]:
            pts = [(m, r[key]) for m, r in zip(Ms, rs) if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if "bwd" in key or "ideal" in key else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N x K = {N} x {K}")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time (us)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset of shapes and M")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--png", help="draw time vs M per shape here")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--shapes", help="e.g. 4096x11008,28672x8192")
    ap.add_argument("--ms", help="e.g. 1,8,32")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    Ms = QUICK_MS if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        Ms = [int(v) for v in args.ms.split(",")]
    bnb = try_import_bnb()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # torch's default, stated
    bw = measure_copy_bw()
    rate = measure_mm_rate()
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"bitsandbytes {'%s' % bnb.__version__ if bnb else 'not installed'}; torch {torch.__version__}")
    print("times in us per call (median); ideal4 = max((packed + scales + x + out bytes) / bw, flops / rate); "
          "ratio = lowbit f+b / bf16 f+b")
    print(HEADER)
    rows = []
    t0 = time.time()
    for N, K in shapes:
        rows += bench_shape(N, K, Ms, bw, rate, bnb, do_bwd=not args.no_bwd)
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s")
    meta = dict(device=dev, copy_bw=bw, bf16_rate=rate, torch=torch.__version__,
                bnb=getattr(bnb, "__version__", None), lowbit=lowbit.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
