"""Host cost of AdamW8bit.step() per parameter tensor.

A step of many small tensors (LoRA adapters) is bound by the host: Python
list handling, the dispatcher converting the op's seven tensor lists, the C++
argument checks and the launches. This measures that cost with tiny tensors
(16 elements by default, so the arithmetic is negligible), as the difference
between N tensors and 1 tensor divided by N - 1 (fixed costs cancel), median
of --iters calls (time.perf_counter).

Rows
  step     opt.step()
  python   opt.step() with the op replaced by a no-op: the optimizer's own Python work
  op       the op alone on the optimizer's lists (dispatcher + checks + kernels)

On the CPU the op's row includes the CPU update itself (~0.5 us per 16-element
tensor); on CUDA it is host time only (the GPU is synchronized before each call).

    python benchmarks/bench_optim_host.py [--device cpu|cuda] [--tensors 448] [--numel 16]
"""
import argparse
import json
import statistics
import sys
import time

import torch

try:
    import lowbit  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, "python")
    import lowbit  # noqa: F401
from lowbit import functional
from lowbit.optim import AdamW8bit
from lowbit.optim import adamw as adamw_mod


def median_s(fn, iters, warmup, sync):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure(device, n, numel, eight_bit, iters, warmup):
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ps = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = AdamW8bit(ps, lr=1e-3, min_8bit_size=0 if eight_bit else 1 << 30)
    opt.step()
    lists = opt._collect(0, opt.param_groups[0], "AdamW8bit")[torch.device(device)]
    args = [lists[k] for k in ("p", "g", "s1", "s2", "a1", "a2", "step")]
    lr = opt._lr_arg(1e-3, torch.device(device))
    c1, c2 = functional.get_dynamic_map(True, device), functional.get_dynamic_map(False, device)
    op = torch.ops.lowbit.adamw8bit_step.default
    r = {}
    r["step"] = median_s(opt.step, iters, warmup, sync)
    real = adamw_mod._adamw8bit_step
    adamw_mod._adamw8bit_step = lambda *a: None
    try:
        r["python"] = median_s(opt.step, iters, warmup, sync)
    finally:
        adamw_mod._adamw8bit_step = real
    r["op"] = median_s(lambda: op(*args, lr, c1, c2, 0.9, 0.999, 1e-8, 0.01, 256, True), iters, warmup, sync)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", type=int, default=448)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier figures)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, tensors=args.tensors, numel=args.numel,
                           rows=rows), f, indent=2)


def run(args):
    rows = []
    print(f"device {args.device}, torch {torch.__version__}, {args.tensors} tensors of {args.numel} elements; "
          f"us per tensor = (t[N] - t[1]) / (N - 1)")
    print(f"{'states':8} {'row':8} {'total us':>10} {'us/tensor':>10}")
    with torch.no_grad():
        for eight_bit in (False, True):
            one = measure(args.device, 1, args.numel, eight_bit, args.iters, args.warmup)
            many = measure(args.device, args.tensors, args.numel, eight_bit, args.iters, args.warmup)
            for k in many:
                per = (many[k] - one[k]) / (args.tensors - 1) * 1e6
                rows.append(dict(states="8-bit" if eight_bit else "float32", row=k, total_us=many[k] * 1e6,
                                 us_per_tensor=per))
                print(f"{rows[-1]['states']:8} {k:8} {many[k] * 1e6:10.1f} {per:10.3f}")
    return rows


if __name__ == "__main__":
    main()
