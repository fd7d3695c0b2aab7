"""One QLoRA layer, forward and backward: lowbit Linear4bit + LoRA against
bitsandbytes Linear4bit + PEFT LoRA and bf16 nn.Linear + PEFT LoRA, in one run.

Each case is a layer of weight shape out x in (4096x4096, 11008x4096), LoRA
rank r (16, 64, alpha = 2r, no dropout) and a batch of tokens (1x512, 1x2048,
4x2048), bf16 activations. The base weight is frozen; fwd+bwd computes the
gradients of x and of the LoRA matrices (torch.autograd.grad, so nothing
accumulates between calls). Columns:

  fwd_ms          forward under torch.no_grad (inference), median of CUDA-event spans
  fwdbwd_ms       forward + backward as a training step sees it: median CUDA-event
                  span of one call, launch gaps included
  device_ms       fwd+bwd device time alone: a CUDA graph of several calls replayed
                  (method "graph"), or, where a library cannot be captured, the sum
                  of its kernel times from torch.profiler (method "kernels")
  host_ms         host time to issue one fwd+bwd: N calls back to back, no
                  synchronization, wall time / N (host_fwd_ms: the same for fwd)
  bound           "host" when host_ms >= device_ms: the GPU waits for Python
  ideal_ms        max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured
                  in this run; FLOPs = 4MNK + 6Mr(N+K), bytes = the base weight
                  read twice plus the activations (approximate)
  vs_bnb          bnb+PEFT fwdbwd_ms / this row's fwdbwd_ms

Layers and inputs are rotated over several copies so the weights are read from
HBM, not L2. PEFT's adapters are cast to --peft-adapter-dtype (default bf16,
so all three compute in bf16; PEFT itself leaves adapters over a 4-bit base in
float32). lowbit keeps float32 adapters and casts them per call, as it trains.
bitsandbytes or peft missing: their rows are skipped with a note.

    python benchmarks/bench.py --mode linear [-- --quick] [--json out.json]
    python benchmarks/bench_linear.py [--quick] [--json out.json]
    python benchmarks/bench_linear.py --smoke        # CPU, tiny shapes: checks the code path only
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import lowbit
except ImportError:  # a source checkout that was not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import lowbit
from lowbit import Linear4bit  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]  # (out_features, in_features)
TOKENS = [(1, 512), (1, 2048), (4, 2048)]  # (batch, sequence)
RANKS = [16, 64]
QUICK = dict(shapes=[(4096, 4096), (11008, 4096)], tokens=[(1, 512), (4, 2048)], ranks=[16])
SMOKE = dict(shapes=[(96, 64)], tokens=[(1, 8), (2, 16)], ranks=[4])
IMPLS = ("lowbit", "bnb+peft", "bf16+peft")
COLUMNS = ["shape", "tokens", "r", "impl", "fwd_ms", "fwdbwd_ms", "device_ms", "host_fwd_ms", "host_ms", "bound",
           "ideal_ms", "vs_bnb"]


# ------------------------------------------------------------------ optional libraries


def _import_bnb():
    try:
        import bitsandbytes as bnb

        return bnb, None
    except Exception as e:  # not installed, or no usable build
        return None, f"bitsandbytes not usable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _import_peft():
    try:
        import peft

        return peft, None
    except Exception as e:
        return None, f"peft not usable ({type(e).__name__})"


# ------------------------------------------------------------------ layers


class _Holder(nn.Module):
    """The one-module model PEFT injects its LoRA layer into."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _with_peft(peft, base: nn.Module, r: int, adapter_dtype: torch.dtype) -> nn.Module:
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], bias="none")
    model = peft.inject_adapter_in_model(cfg, _Holder(base))
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.to(adapter_dtype)
    return model


def build_layer(impl: str, w: torch.Tensor, r: int, device, libs, adapter_dtype) -> nn.Module:
    """One layer computing x @ w^T + LoRA, base frozen, LoRA trainable."""
    n_out, k_in = w.shape
    lin = nn.Linear(k_in, n_out, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    if impl == "lowbit":
        layer = Linear4bit.from_linear(lin, r=r, lora_alpha=2 * r, compute_dtype=torch.bfloat16, device=device)
        layer.requires_grad_(False)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        return layer
    if impl == "bf16+peft":
        lin.requires_grad_(False)
        return _with_peft(libs["peft"], lin, r, adapter_dtype)
    if impl == "bnb+peft":
        bnb = libs["bnb"]
        q = bnb.nn.Linear4bit(k_in, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
        q.load_state_dict({"weight": w.detach().cpu()})
        q = q.to(device)  # bitsandbytes quantizes on the move to a device
        return _with_peft(libs["peft"], q, r, adapter_dtype)
    raise ValueError(f"unknown impl {impl!r}")


def trainable(layer: nn.Module):
    return [p for p in layer.parameters() if p.requires_grad]


def make_calls(layer, x, g):
    params = trainable(layer)

    def fwd():
        with torch.no_grad():
            return layer(x)

    def fwdbwd():
        y = layer(x)
        return torch.autograd.grad(y, [x] + params, g)

    return fwd, fwdbwd


# ------------------------------------------------------------------ timing


def _cpu_median_ms(fns, warmup, reps):
    for i in range(warmup):
        fns[i % len(fns)]()
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_call_ms(fns, device, warmup, reps):
    """Median span of one call: CUDA events on the GPU, wall time on the CPU."""
    if device.type != "cuda":
        return _cpu_median_ms(fns, warmup, reps)
    from common import median_ms

    return median_ms(lambda f: f(), fns, warmup=warmup, reps=reps)


def host_ms(fns, device, n):
    """Wall time per call of n calls issued back to back, before any
    synchronization: the host's cost of issuing the work."""
    fns[0]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fns[i % len(fns)]()
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def _kernel_ms(fns, n):
    """Sum of the device times of the kernels (and copies) of n calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    fns[0]()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
    total_us = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return total_us / 1e3 / n if total_us > 0 else None


def device_ms(fns, device, reps):
    """(device time per call, method), or (None, None) off the GPU."""
    if device.type != "cuda":
        return None, None
    from common import graph_ms

    ms = graph_ms(lambda f: f(), fns, calls=max(len(fns), 4), warmup=3, reps=reps)
    if ms is not None:
        return ms, "graph"
    try:
        return _kernel_ms(fns, max(len(fns), 10)), "kernels"
    except Exception:
        return None, None


# ------------------------------------------------------------------ ceilings and the ideal


def ceilings(device):
    if device.type != "cuda":
        return None, None
    from common import copy_bandwidth_gbs, matmul_tflops

    return copy_bandwidth_gbs() * 1e9, matmul_tflops() * 1e12


def ideal_ms(impl, n_out, k_in, m, r, bw, rate):
    if bw is None:
        return None
    w_bytes = n_out * k_in * 2 if impl == "bf16+peft" else n_out * k_in // 2 + n_out * k_in // 64
    act_bytes = 2 * (3 * m * k_in + 3 * m * n_out)
    flops = 4 * m * n_out * k_in + 6 * m * r * (n_out + k_in)
    return max((2 * w_bytes + act_bytes) / bw, flops / rate) * 1e3


# ------------------------------------------------------------------ one case


def _copies(device, n_out, k_in, impl, quick):
    if device.type != "cuda":
        return 1
    from common import copies_for

    w_bytes = n_out * k_in * (2 if impl == "bf16+peft" else 0.53)
    return copies_for(int(w_bytes), at_most=4 if quick else 8)


def run_case(impl, n_out, k_in, batch, seq, r, device, libs, args, weights):
    m = batch * seq
    ncopy = _copies(device, n_out, k_in, impl, args.quick)
    layers, fwds, steps = [], [], []
    for i in range(ncopy):
        layer = build_layer(impl, weights[i % len(weights)], r, device, libs, args.adapter_dtype)
        # LoRA B starts at zero; a nonzero B makes every gradient path do real work.
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0, 0.01)
        x = torch.randn(batch, seq, k_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(batch, seq, n_out, device=device, dtype=torch.bfloat16)
        f, fb = make_calls(layer, x, g)
        layers.append(layer)
        fwds.append(f)
        steps.append(fb)
    row = dict(shape=f"{n_out}x{k_in}", tokens=f"{batch}x{seq}", r=r, impl=impl, copies=ncopy)
    row["fwd_ms"] = median_call_ms(fwds, device, args.warmup, args.reps)
    row["fwdbwd_ms"] = median_call_ms(steps, device, args.warmup, args.reps)
    row["host_fwd_ms"] = host_ms(fwds, device, args.host_iters)
    row["host_ms"] = host_ms(steps, device, args.host_iters)
    row["device_ms"], row["device_method"] = device_ms(steps, device, args.reps)
    if row["device_ms"] is not None:
        row["bound"] = "host" if row["host_ms"] >= row["device_ms"] else "device"
    row["ideal_ms"] = ideal_ms(impl, n_out, k_in, m, r, args.bw, args.rate)
    del layers, fwds, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------ output


def _fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows, columns=COLUMNS):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="r=16, tokens 1x512 and 4x2048 only, fewer repeats")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few repeats: checks the code path")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--peft-adapter-dtype", dest="adapter_dtype", default="bfloat16",
                    choices=["bfloat16", "float32"], help="dtype of PEFT's LoRA matrices (default %(default)s)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--host-iters", type=int)
    args = ap.parse_args(argv)
    args.adapter_dtype = getattr(torch, args.adapter_dtype)
    small = args.smoke or args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5 if small else 10)
    args.reps = args.reps if args.reps is not None else (3 if args.smoke else 20 if small else 50)
    args.host_iters = args.host_iters if args.host_iters is not None else (3 if args.smoke else 20)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        device, plan = torch.device("cpu"), SMOKE
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_linear: needs a CUDA GPU (none visible); --smoke runs a CPU check of the code path")
        device, plan = torch.device("cuda"), (QUICK if args.quick else
                                              dict(shapes=SHAPES, tokens=TOKENS, ranks=RANKS))
    bnb, bnb_note = _import_bnb()
    peft, peft_note = _import_peft()
    notes = []
    impls = []
    for impl in args.impls:
        if "peft" in impl and peft is None:
            notes.append(f"{impl} skipped: {peft_note}")
        elif impl == "bnb+peft" and bnb is None:
            notes.append(f"{impl} skipped: {bnb_note}")
        elif impl == "bnb+peft" and device.type != "cuda":
            notes.append(f"{impl} skipped: timed on CUDA only")
        else:
            impls.append(impl)
    libs = dict(bnb=bnb, peft=peft)
    args.bw, args.rate = ceilings(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = dict(card=card, date=datetime.date.today().isoformat(), commit=_commit(), torch=torch.__version__,
                lowbit=lowbit.__version__, bitsandbytes=getattr(bnb, "__version__", None),
                peft=getattr(peft, "__version__", None), copy_bw_Bps=args.bw, bf16_flops=args.rate,
                warmup=args.warmup, reps=args.reps, host_iters=args.host_iters,
                peft_adapter_dtype=str(args.adapter_dtype).removeprefix("torch."), smoke=args.smoke, notes=notes)
    print(f"# linear layer fwd+bwd: {card}, torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, "
          f"peft {meta['peft']}, commit {meta['commit']}")
    if args.bw:
        print(f"measured copy bandwidth {args.bw / 1e12:.2f} TB/s, bf16 matmul {args.rate / 1e12:.0f} TFLOP/s")
    for n in notes:
        print(f"note: {n}")
    rows = []
    t0 = time.perf_counter()
    for n_out, k_in in plan["shapes"]:
        gen = torch.Generator(device=device).manual_seed(0)
        nw = 1 if device.type != "cuda" else max(
            [_copies(device, n_out, k_in, i, args.quick) for i in impls], default=1)
        weights = [torch.randn(n_out, k_in, device=device, generator=gen).mul_(0.02).to(torch.bfloat16)
                   for _ in range(nw)]
        for batch, seq in plan["tokens"]:
            for r in plan["ranks"]:
                case_rows = []
                for impl in impls:
                    try:
                        case_rows.append(run_case(impl, n_out, k_in, batch, seq, r, device, libs, args, weights))
                    except Exception as e:  # report and go on with the others
                        case_rows.append(dict(shape=f"{n_out}x{k_in}", tokens=f"{batch}x{seq}", r=r, impl=impl,
                                              error=f"{type(e).__name__}: {e}"))
                        print(f"error: {impl} {n_out}x{k_in} {batch}x{seq} r={r}: {type(e).__name__}: {e}")
                base = next((c for c in case_rows if c["impl"] == "bnb+peft" and "fwdbwd_ms" in c), None)
                for c in case_rows:
                    if base is not None and "fwdbwd_ms" in c:
                        c["vs_bnb"] = base["fwdbwd_ms"] / c["fwdbwd_ms"]
                rows += case_rows
        del weights
    meta["seconds"] = time.perf_counter() - t0
    print()
    print(markdown_table(rows))
    errors = [r for r in rows if "error" in r]
    if errors:
        print("\nerrors:")
        for r in errors:
            print(f"- {r['impl']} {r['shape']} {r['tokens']} r={r['r']}: {r['error']}")
    print(f"\n{len(rows)} rows in {meta['seconds']:.0f} s")
    out = dict(meta=meta, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
