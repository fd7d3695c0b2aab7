"""Optimizer step time on one CUDA GPU: lowbit AdamW8bit / PagedAdamW8bit
against torch.optim.AdamW(fused=True) and, when installed, bitsandbytes'
AdamW8bit / PagedAdamW8bit.

Cases
  large  256 tensors of 4096x1024 fp32 (1.07e9 parameters)
  lora   the LoRA adapters (r=16) of Llama-2-7B's seven projections x 32 layers
         (~40M parameters in 448 small tensors): launch overhead shows here

Each figure is the median of --iters steps timed with CUDA events after
--warmup steps. Beside it: the memory-bound ideal, bytes moved per step divided
by the copy bandwidth measured on the same card in the same run (16 B/param for
8-bit states: param read+write 8, grad read 4, m and v read+write 4; 28 B/param
for float32 states). The working sets are many times the L2 size, so nothing
stays cached between steps.

    python benchmarks/bench_optim.py --json results_optim.json
"""
import argparse
import gc
import json
import statistics
import sys

import torch

try:
    import lowbit
    from lowbit.optim import AdamW8bit, PagedAdamW8bit, state_bytes
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, "python")
    import lowbit
    from lowbit.optim import AdamW8bit, PagedAdamW8bit, state_bytes

try:
    import bitsandbytes as bnb
except Exception:  # not installed, or no usable CUDA build
    bnb = None

HIDDEN, INTER, LAYERS, RANK = 4096, 11008, 32, 16


def copy_bandwidth(nbytes=1 << 30, iters=20):
    """Device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    times = timed(lambda: dst.copy_(src), warmup=3, iters=iters)
    del src, dst
    return 2 * nbytes / (statistics.median(times) / 1e3)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def large_shapes():
    return [(4096, 1024)] * 256


def lora_shapes():
    proj = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTER)] * 2 + [(INTER, HIDDEN)]  # (in, out): q k v o, gate up, down
    shapes = []
    for _ in range(LAYERS):
        for k, n in proj:
            shapes += [(RANK, k), (n, RANK)]  # A [r, in], B [out, r]
    return shapes


def optimizers():
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    out = [
        ("lowbit AdamW8bit", lambda ps: AdamW8bit(ps, **kw), 16),
        ("lowbit PagedAdamW8bit", lambda ps: PagedAdamW8bit(ps, **kw), 16),
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True, **kw), 28),
    ]
    if bnb is not None:
        out += [
            ("bnb AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, **kw), 16),
            ("bnb PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, **kw), 16),
        ]
    return out


def run_case(name, shapes, bandwidth, args):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    nparams = sum(p.numel() for p in params)
    rows = []
    for opt_name, factory, bytes_per_param in optimizers():
        if args.only and not any(o.lower() in opt_name.lower() for o in args.only):
            continue
        opt = None
        try:
            opt = factory(params)
            times = timed(opt.step, warmup=args.warmup, iters=args.iters)
            sb = state_bytes(opt)
            ideal_ms = bytes_per_param * nparams / bandwidth * 1e3
            med = statistics.median(times)
            rows.append(dict(case=name, optimizer=opt_name, params=nparams, tensors=len(params),
                             ms_median=med, ms_min=min(times), ms_max=max(times), ideal_ms=ideal_ms,
                             pct_of_ideal=100 * ideal_ms / med, state_bytes_per_param=sb / nparams,
                             bytes_moved_per_param=bytes_per_param))
        except Exception as e:  # report and go on with the other optimizers
            rows.append(dict(case=name, optimizer=opt_name, params=nparams, tensors=len(params),
                             error=f"{type(e).__name__}: {e}"))
        del opt
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    del params
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cases", nargs="+", default=["large", "lora"], choices=["large", "lora"])
    ap.add_argument("--only", nargs="+", help="optimizer name substrings to run (default: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_optim: needs a CUDA device")

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"device: {device}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}; "
          f"bitsandbytes {getattr(bnb, '__version__', 'not available')}")
    rows = []
    for case in args.cases:
        shapes = large_shapes() if case == "large" else lora_shapes()
        rows += run_case(case, shapes, bandwidth, args)

    hdr = f"{'case':6} {'optimizer':24} {'tensors':>7} {'params':>11} {'ms/step':>9} {'ideal ms':>9} {'% ideal':>8} {'state B/param':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:6} {r['optimizer']:24} {r['tensors']:7d} {r['params']:11d}  error: {r['error']}")
            continue
        print(f"{r['case']:6} {r['optimizer']:24} {r['tensors']:7d} {r['params']:11d} {r['ms_median']:9.3f} "
              f"{r['ideal_ms']:9.3f} {r['pct_of_ideal']:7.1f}% {r['state_bytes_per_param']:13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bandwidth_Bps=bandwidth, torch=torch.__version__,
                           bitsandbytes=getattr(bnb, "__version__", None), lowbit=lowbit.__version__,
                           warmup=args.warmup, iters=args.iters, results=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
