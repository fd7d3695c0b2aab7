"""QLoRA training of a Llama-2-7B-shaped model on one GPU: memory and speed.

The model is transformers' LlamaForCausalLM with Llama-2-7B's shapes (hidden
4096, intermediate 11008, 32 layers, 32 heads, vocabulary 32000) and random
weights, built on the meta device and filled one decoder layer at a time, so
the 16-bit model never exists in full on the GPU (except for --impl bf16,
whose point it is). Training: LoRA r=16, alpha 32, dropout 0.05 on q, k, v, o,
gate, up and down; gradient checkpointing (non-reentrant); random tokens; lr 2e-4.

Implementations (--impl, each in a fresh subprocess so memory starts clean)
  lowbit  lowbit.quantize_model (NF4, double quant) + lowbit.optim.PagedAdamW8bit
  bnb     bitsandbytes nn.Linear4bit (NF4, double quant) + peft LoRA +
          bitsandbytes PagedAdamW8bit (the other 16-bit weights stay bf16, as here)
  bf16    the bf16 model + peft LoRA + torch.optim.AdamW (fused)

Per configuration (batch x seq, --configs): the weight memory, peak allocated
and reserved (torch.cuda.max_memory_*, reset per configuration), the median step
time and tokens/s, and for lowbit the estimate of lowbit.plan_memory beside the
measured peak with its error. An out-of-memory configuration is reported as OOM.
--options runs the lowbit rows with lowbit's memory-lean options too: `ce`
(lowbit.nn.causal_lm_loss: the loss in chunks, never the full fp32 logits) and
`ce+offload` (and lowbit.nn.offload_activations: the checkpointed layer inputs
in pinned host memory), so their cost in tokens/s stands beside the plain rows.
--fuse-norms computes the RMSNorms with torch's fused kernel
(lowbit.nn.fuse_rms_norms). --cuda-graph replays the lowbit step from a CUDA graph (lowbit.CUDAGraphStep),
which removes the host's launch overhead that bounds short sequences.
--max-seq searches the longest sequence that trains at batch 1 under a 24 GiB
cap (torch.cuda.set_per_process_memory_fraction) with each option set of
--max-seq-options. The paged optimizer's managed memory is outside that cap (a
few tens of MiB here).

    python benchmarks/bench_qlora7b.py --impl lowbit,bnb,bf16 --json out.json
    python benchmarks/bench_qlora7b.py --impl lowbit --options plain,ce,ce+offload --max-seq
    python benchmarks/bench_qlora7b.py --tiny --impl lowbit --steps 2   # CPU smoke test
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import lowbit
except ImportError:  # a source checkout without installing
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import lowbit

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = dict(r=16, alpha=32.0, dropout=0.05)
LR = 2e-4
CAP_GIB = 24
RESULT = "@@result "
GIB = 2**30


# ---------------------------------------------------------------- model

def _fill(module, device, dtype, std=0.02):
    """Real tensors for the parameters `module` itself holds on the meta device."""
    import torch.nn as nn

    is_norm = type(module).__name__.endswith("RMSNorm")
    for name, p in list(module.named_parameters(recurse=False)):
        if not p.is_meta:
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        t.fill_(1.0) if is_norm else t.normal_(0.0, std)
        setattr(module, name, nn.Parameter(t, requires_grad=False))


def _bnb_convert(layer, device):
    import bitsandbytes as bnb
    import torch.nn as nn

    for name, lin in list(layer.named_modules()):
        if type(lin) is not nn.Linear or not name.endswith(TARGETS):
            continue
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64).to(device)
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, q)
        del lin


def build(impl, shape, device):
    """(model, optimizer) ready to train, converted layer by layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.io.skeleton import parameters_on_meta

    cfg = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    with parameters_on_meta():
        model = LlamaForCausalLM(cfg)
    dt = torch.bfloat16
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        _fill(mod, device, dt)
    for layer in model.model.layers:
        for mod in layer.modules():
            _fill(mod, device, dt)
        if impl == "lowbit":
            lowbit.quantize_model(layer, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules=TARGETS, device=device, progress=False)
        elif impl == "bnb":
            _bnb_convert(layer, device)
    model.to(device)  # the buffers (rotary frequencies)
    if impl == "lowbit":
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, lowbit.Linear4bit) and m.lora_A is not None:
                m.lora_A.requires_grad_(True)
                m.lora_B.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "lowbit":
        opt = lowbit.optim.PagedAdamW8bit(params, lr=LR)
    elif impl == "bnb":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=LR)
    else:
        opt = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    return model, opt


OPTIONS = ("plain", "ce", "ce+offload")  # memory-lean options: chunked cross-entropy, checkpoints in host memory


def train_step(model, opt, ids, opts="plain"):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "offload" in opts:
        with lowbit.nn.offload_activations():
            loss = lowbit.nn.causal_lm_loss(lm, ids)
    elif "ce" in opts:
        loss = lowbit.nn.causal_lm_loss(lm, ids)
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e):
    # The caching allocator raises OutOfMemoryError; cuBLAS and the managed
    # allocation of the paged optimizer raise RuntimeErrors of their own.
    msg = str(e)
    return isinstance(e, torch.OutOfMemoryError) or any(
        k in msg for k in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "managed memory"))


def run_config(model, opt, device, vocab, batch, seq, steps, warmup, opts="plain", graph=False):
    """Median step time and the memory peaks of `steps` timed steps; None on OOM."""
    _clean(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device="cpu").manual_seed(batch * 100003 + seq)
    times = []
    oom = False
    step = lambda ids: train_step(model, opt, ids, opts)  # noqa: E731
    if graph:
        # Two eager warm-up steps, the capture in the third (all untimed).
        step = lowbit.CUDAGraphStep(step, opt, warmup=2)
        warmup = max(warmup, 3)
    try:
        for i in range(warmup + steps):
            ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            loss = step(ids)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss).all():
            raise RuntimeError(f"non-finite loss at {batch}x{seq}")
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not _is_oom(e):
            raise
        oom = True
    step = None  # a captured graph's memory pool goes with it
    if oom:
        opt.zero_grad(set_to_none=True)
        _clean(device)
        return None
    out = dict(step_ms=1e3 * statistics.median(times), tokens_per_s=batch * seq / statistics.median(times))
    if device.type == "cuda":
        out.update(peak_allocated=torch.cuda.max_memory_allocated(device),
                   peak_reserved=torch.cuda.max_memory_reserved(device))
    return out


def planned(shape, batch, seq, opts, impl):
    if impl != "lowbit":
        return None
    return lowbit.plan_memory(dict(shape), batch_size=batch, seq_len=seq, lora_r=LORA["r"],
                              lora_dropout=LORA["dropout"], lora_targets=TARGETS, chunked_ce="ce" in opts,
                              offload_checkpoints="offload" in opts)


def search_max_seq(model, opt, device, vocab, opts, granularity, hi_limit):
    """Longest batch-1 sequence (a multiple of `granularity`) that trains under the cap."""
    def ok(n):
        return run_config(model, opt, device, vocab, 1, n, steps=1, warmup=1, opts=opts) is not None

    lo, n = 0, granularity * 4
    while n <= hi_limit and ok(n):
        lo, n = n, n * 2
    hi = min(n, hi_limit + granularity)
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def worker(args):
    shape = TINY if args.tiny else SEVEN_B
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        raise SystemExit("the 7B benchmark needs a CUDA GPU (use --tiny for the CPU smoke test)")
    if args.impl == "bnb" and not cuda:
        raise SystemExit("bnb needs a CUDA GPU")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, opt = build(args.impl, shape, device)
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(device) if cuda else None

    def emit(d):
        print(RESULT + json.dumps(d), flush=True)

    emit(dict(kind="build", impl=args.impl, build_s=build_s, weights=weights))
    if args.fuse_norms:
        lowbit.nn.fuse_rms_norms(model)
    if args.cap_gib and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), torch.cuda.current_device())
    for opts in args.options.split(","):
        for cfg in args.configs.split(","):
            b, s = (int(v) for v in cfg.lower().split("x"))
            graph = args.cuda_graph and cuda
            if graph and "offload" in opts:
                continue  # host-memory offload allocates pinned buffers per step: not capturable
            res = run_config(model, opt, device, shape["vocab_size"], b, s, args.steps, args.warmup, opts, graph)
            plan = planned(shape, b, s, opts, args.impl)
            label = opts + ("+norms" if args.fuse_norms else "") + ("+graph" if graph else "")
            row = dict(kind="config", impl=args.impl, options=label, config=cfg, batch=b, seq=s, oom=res is None,
                       weights=weights, planned_peak=plan.peak_allocated if plan else None,
                       planned_reserved=plan.reserved if plan else None)
            row.update(res or {})
            emit(row)
    if args.max_seq and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        _clean(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total), torch.cuda.current_device())
        gran = 16 if args.tiny else 256
        limit = 4096 if args.tiny else 131072
        for opts in args.max_seq_options.split(","):
            n = search_max_seq(model, opt, device, shape["vocab_size"], opts, gran, limit)
            plan_n = None
            if args.impl == "lowbit":
                plan_n = lowbit.max_seq_len(dict(shape), CAP_GIB, 1, lora_r=LORA["r"], lora_dropout=LORA["dropout"],
                                            chunked_ce="ce" in opts, offload_checkpoints="offload" in opts,
                                            cuda_context_bytes=0)
            emit(dict(kind="max_seq", impl=args.impl, options=opts, max_seq=n, planned_max_seq=plan_n,
                      cap_gib=CAP_GIB))


# ---------------------------------------------------------------- driver

def _gib(b):
    return "" if b is None else f"{b / GIB:.2f}"


def drive(args):
    rows, maxseq, builds = [], [], []
    for impl in args.impl.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--configs", args.configs,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--max-seq", "--max-seq-options", args.max_seq_options] if args.max_seq else []
        cmd += ["--options", args.options if impl == "lowbit" else "plain"]
        cmd += ["--cap-gib", str(args.cap_gib)] if args.cap_gib else []
        cmd += ["--cuda-graph"] if args.cuda_graph and impl == "lowbit" else []
        cmd += ["--fuse-norms"] if args.fuse_norms and impl == "lowbit" else []
        print(f"# {impl}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        got = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        for d in got:
            {"build": builds, "config": rows, "max_seq": maxseq}[d.pop("kind")].append(d)
        if proc.returncode != 0:
            rows.append(dict(impl=impl, config="-", error=f"worker exited with status {proc.returncode}"))
    cols = ["impl", "options", "config", "weights GiB", "peak alloc GiB", "planned GiB", "plan error", "reserved GiB",
            "step ms", "tokens/s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if r.get("error") or r.get("oom"):
            cells = [r["impl"], r.get("options", ""), r["config"], _gib(r.get("weights")),
                     r.get("error") or "OOM"] + [""] * 5
        else:
            peak, plan = r.get("peak_allocated"), r.get("planned_peak")
            err = f"{100 * (plan - peak) / peak:+.1f}%" if peak and plan else ""
            cells = [r["impl"], r.get("options", "plain"), r["config"], _gib(r.get("weights")), _gib(peak), _gib(plan), err,
                     _gib(r.get("peak_reserved")), f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if maxseq:
        print(f"\nLongest sequence at batch 1 under a {CAP_GIB} GiB cap")
        print("| impl | options | longest seq | planned |")
        print("|---|---|---|---|")
        for r in maxseq:
            print(f"| {r['impl']} | {r['options']} | {r['max_seq']} | {r['planned_max_seq'] or ''} |")
    if args.json:
        meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, tiny=args.tiny)
        if torch.cuda.is_available():
            from common import device_name

            meta["card"] = device_name()
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, builds=builds, rows=rows, max_seq=maxseq), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0 if all(not r.get("error") for r in rows) else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="lowbit,bnb,bf16", help="comma-separated: lowbit, bnb, bf16")
    ap.add_argument("--configs", help="comma-separated BATCHxSEQ (default 1x512,1x2048,4x2048; --tiny 1x32,2x64)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the optimizer state appears here)")
    ap.add_argument("--max-seq", action="store_true", help=f"search the longest batch-1 seq under {CAP_GIB} GiB")
    ap.add_argument("--options", default="plain",
                    help="comma-separated memory-lean options for the lowbit rows: plain, ce (lowbit.nn.causal_lm_loss's "
                         "chunked cross-entropy), ce+offload (and lowbit.nn.offload_activations)")
    ap.add_argument("--cap-gib", type=float, help="cap the configurations' GPU memory at this many GiB "
                    "(torch.cuda.set_per_process_memory_fraction), e.g. 24 with --configs 1x32768")
    ap.add_argument("--fuse-norms", action="store_true",
                    help="lowbit rows: RMSNorm through torch's fused rms_norm (lowbit.nn.fuse_rms_norms)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="lowbit rows: each step captured once and replayed (lowbit.CUDAGraphStep); not with offload")
    ap.add_argument("--max-seq-options", default=",".join(OPTIONS), help="options tried by --max-seq")
    ap.add_argument("--quick", action="store_true", help="1x512 and 1x2048 only, 3 steps after 1 warm-up")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama config (runs on the CPU without a GPU)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for impl in args.impl.split(","):
        if impl not in ("lowbit", "bnb", "bf16"):
            ap.error(f"--impl: unknown implementation {impl!r} (lowbit, bnb, bf16)")
    for o in args.options.split(",") + args.max_seq_options.split(","):
        if o not in OPTIONS:
            ap.error(f"--options: unknown option set {o!r} ({', '.join(OPTIONS)})")
    if args.quick:
        args.configs = args.configs or "1x512,1x2048"
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    args.configs = args.configs or ("1x32,2x64" if args.tiny else "1x512,1x2048,4x2048")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        return worker(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
