"""Quantize / dequantize throughput at Llama weight shapes (bf16), lowbit vs
bitsandbytes in the same run, with the memory-bound ideal beside each."""
import argparse

import torch

from lowbit import functional as F
from lowbit import ops

from common import copies_for, copy_bandwidth_gbs, graph_ms, median_ms

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]


def run(args):
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or no usable build
        bnbF = None
    bw = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {bw:.0f} GB/s (read + write)")
    rows = []
    bs = 64
    for n_out, k in SHAPES[: 2 if args.quick else None]:
        n = n_out * k
        nblk = n // bs
        q_bytes = 2 * n + n // 2 + 4 * nblk  # read bf16, write codes + float32 absmax
        dq_bytes = n // 2 + 4 * nblk + 2 * n
        dq_nested_bytes = n // 2 + nblk + 2 * n
        ncopies = copies_for(2 * n)
        ws = [torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) for _ in range(ncopies)]
        code = F.get_4bit_code("nf4", "cuda")

        def add(name, impl, fn, inputs, nbytes):
            # call_us: one call as a program sees it (events around each call,
            # host overhead included); device_us: replayed from a CUDA graph.
            ideal = nbytes / (bw * 1e9) * 1e6
            call = median_ms(fn, inputs) * 1e3
            dev = graph_ms(fn, inputs)
            dev = None if dev is None else dev * 1e3
            best = dev if dev is not None else call
            rows.append(dict(shape=f"{n_out}x{k}", op=name, impl=impl, call_us=round(call, 1),
                             device_us="n/a" if dev is None else round(dev, 1), ideal_us=round(ideal, 1),
                             pct_of_ideal=round(100 * ideal / best, 1)))

        add("quantize", "lowbit", lambda w: ops.quantize_4bit(w, bs, "nf4"), ws, q_bytes)
        add("quantize+dq", "lowbit",
            lambda w: F.quantize_4bit(w, bs, "nf4", double_quant=True, check_finite=False), ws, q_bytes)
        if bnbF is not None:
            add("quantize", "bnb", lambda w: bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4"), ws, q_bytes)
            add("quantize+dq", "bnb",
                lambda w: bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True), ws, q_bytes)

        packs = [F.quantize_4bit(w, bs, "nf4", double_quant=False) for w in ws[: max(2, ncopies)]]
        packs_dq = [F.quantize_4bit(w, bs, "nf4", double_quant=True) for w in ws[: max(2, ncopies)]]
        del ws
        add("dequantize", "lowbit",
            lambda ps: ops.dequantize_4bit(ps[0], ps[1].absmax, code, bs, (n_out, k), torch.bfloat16), packs,
            dq_bytes)
        add("dequantize(dq)", "lowbit", lambda ps: F.dequantize_4bit(ps[0], ps[1]), packs_dq, dq_nested_bytes)
        if bnbF is not None:
            bpacks = [bnbF.quantize_4bit(torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16), blocksize=bs,
                                         quant_type="nf4") for _ in range(2)]
            add("dequantize", "bnb", lambda ps: bnbF.dequantize_4bit(ps[0], ps[1]), bpacks, dq_bytes)
            bpacks = [bnbF.quantize_4bit(torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16), blocksize=bs,
                                         quant_type="nf4", compress_statistics=True) for _ in range(2)]
            add("dequantize(dq)", "bnb", lambda ps: bnbF.dequantize_4bit(ps[0], ps[1]), bpacks, dq_nested_bytes)
            del bpacks
        del packs, packs_dq
        torch.cuda.empty_cache()
    return dict(copy_bandwidth_gbs=round(bw, 1), rows=rows), ["shape", "op", "impl", "call_us", "device_us", "ideal_us", "pct_of_ideal"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    from common import print_table

    res, cols = run(ap.parse_args())
    print_table(res["rows"], cols)
