"""Timing helpers shared by the benchmark modes: CUDA events, warm-up, medians,
inputs rotated so repeated calls do not run out of L2, and the measured
ceilings (copy bandwidth, bf16 matmul rate) that the ideal times come from."""
import statistics

import torch


def median_ms(fn, inputs, warmup=10, reps=50):
    """Median time of fn(inp) in milliseconds, cycling through `inputs`."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inp = inputs[i % len(inputs)]
        a.record()
        fn(inp)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, inputs, calls=20, warmup=3, reps=20):
    """Device time per call in ms: `calls` calls (cycling through `inputs`)
    captured in one CUDA graph and replayed, so host overhead and launch gaps
    drop out. Returns None when fn cannot be captured."""
    try:
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(inputs[0])
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for i in range(calls):
                    fn(inputs[i % len(inputs)])
        torch.cuda.current_stream().wait_stream(s)
    except Exception:  # not capturable (host syncs, host->device copies)
        torch.cuda.synchronize()
        return None
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return statistics.median(times)


def copies_for(nbytes, l2_bytes=None, at_least=2, at_most=16):
    """How many input copies to rotate so that the working set is several times L2."""
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    want = -(-4 * l2_bytes // max(nbytes, 1))
    return int(min(max(want, at_least), at_most))


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy rate in GB/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda s: dst.copy_(s), [src], warmup=3, reps=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda x: x @ b, [a], warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name():
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"


def print_table(rows, columns):
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
