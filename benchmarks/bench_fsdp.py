"""QLoRA training of a Llama-2-7B-shaped model: 1 GPU (plain) vs N GPUs (FSDP2 with sharded 4-bit weights).

    python benchmarks/bench_fsdp.py --out DIR [--gpus 1,2] [--layers 32] [--steps 6]
    python benchmarks/bench.py --mode fsdp -- --out DIR

Starts one torchrun per GPU count (NCCL, NVLink multicast off) and reports, per
configuration: tokens/s (all GPUs together and per GPU), peak GPU memory per GPU,
and the bytes all-gathered per training step by each rank. Random weights;
hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000; LoRA r=16 on
all seven projections, PagedAdamW8bit, activation checkpointing per layer,
batch 2 x 2048 tokens per GPU. Layers are built and quantized one at a time on
the GPU, so no rank ever holds the whole model in bf16.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))


# ---------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, d, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-5)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


class Layer(nn.Module):
    def __init__(self, h, inter, heads, device):
        super().__init__()
        self.heads = heads
        lin = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=torch.bfloat16)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(h, h), lin(h, h), lin(h, h), lin(h, h)
        self.gate_proj, self.up_proj, self.down_proj = lin(h, inter), lin(h, inter), lin(inter, h)
        self.in_norm, self.post_norm = RMSNorm(h, device), RMSNorm(h, device)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        y = self.in_norm(x)
        q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.o_proj(a)
        y = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    def __init__(self, layers, device, h=4096, inter=11008, heads=32, vocab=32000, lora_r=16):
        import lowbit

        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, h, device=device, dtype=torch.bfloat16)
        self.layers = nn.ModuleList()
        for _ in range(layers):  # one bf16 layer at a time, quantized at once
            layer = Layer(h, inter, heads, device)
            lowbit.quantize_model(layer, lora_r=lora_r, progress=False)
            self.layers.append(layer)
            torch.cuda.empty_cache()
        self.norm = RMSNorm(h, device)
        self.lm_head = nn.Linear(h, vocab, bias=False, device=device, dtype=torch.bfloat16)
        self.embed.requires_grad_(False)
        self.lm_head.requires_grad_(False)

    def forward(self, ids):
        s = ids.shape[1]
        d = self.embed.weight.shape[1] // self.heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(s, device=ids.device, dtype=torch.float32), inv)
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------- one configuration (under torchrun)

def worker(args):
    import torch.distributed as dist

    import lowbit

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    sharded = world > 1
    if sharded:
        dist.init_process_group("nccl", device_id=dev)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Llama(args.layers, dev)
    build_s = time.perf_counter() - t0
    log = []
    if sharded:
        orig = dist.all_gather_into_tensor

        def counting(output_tensor, input_tensor, group=None, async_op=False):
            log.append(output_tensor.numel() * output_tensor.element_size())
            return orig(output_tensor, input_tensor, group=group, async_op=async_op)

        dist.all_gather_into_tensor = counting
        lowbit.distributed.shard_model(model)
    torch.cuda.empty_cache()
    opt = lowbit.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(rank)
    ids = torch.randint(0, 32000, (args.batch, args.seq + 1), device=dev, generator=g)

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    log.clear()
    times, losses = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    times.sort()
    med = times[len(times) // 2]
    tokens = args.batch * args.seq
    res = dict(
        world=world, rank=rank, card=torch.cuda.get_device_name(dev), layers=args.layers, batch=args.batch,
        seq=args.seq, sharded=sharded, build_s=round(build_s, 1), step_s_median=med,
        tokens_per_s_total=tokens * world / med, tokens_per_s_per_gpu=tokens / med,
        peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
        all_gather_bytes_per_step=sum(log) / args.steps if sharded else 0, losses=losses,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        optimizer_state_bytes=lowbit.optim.state_bytes(opt),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"fsdp_w{world}_rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if rank == 0:
        print(json.dumps(res), flush=True)
    if sharded:
        dist.destroy_process_group()


# ---------------------------------------------------------------- launcher

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_fsdp_out")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        sys.exit("bench_fsdp needs CUDA GPUs")
    summary = []
    for n in [int(s) for s in args.gpus.split(",")]:
        if n > torch.cuda.device_count():
            print(f"skipping {n} GPUs: only {torch.cuda.device_count()} visible")
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), "--worker", "--out", args.out, "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        env = dict(os.environ, NCCL_NVLS_ENABLE="0")
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        ranks = []
        for r in range(n):
            with open(os.path.join(args.out, f"fsdp_w{n}_rank{r}.json")) as f:
                ranks.append(json.load(f))
        summary.append(dict(gpus=n, card=ranks[0]["card"],
                            tokens_per_s_total=min(x["tokens_per_s_total"] for x in ranks),
                            tokens_per_s_per_gpu=min(x["tokens_per_s_per_gpu"] for x in ranks),
                            peak_mem_gib_per_gpu=max(x["peak_mem_gib"] for x in ranks),
                            all_gather_gib_per_step_per_rank=max(x["all_gather_bytes_per_step"] for x in ranks) / 2**30,
                            step_s=max(x["step_s_median"] for x in ranks)))
    print(f"\n{'GPUs':>4} {'tokens/s':>10} {'tok/s/GPU':>10} {'peak GiB/GPU':>13} {'all-gather GiB/step':>20} {'step s':>7}")
    for s in summary:
        print(f"{s['gpus']:>4} {s['tokens_per_s_total']:>10.0f} {s['tokens_per_s_per_gpu']:>10.0f} "
              f"{s['peak_mem_gib_per_gpu']:>13.2f} {s['all_gather_gib_per_step_per_rank']:>20.2f} {s['step_s']:>7.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
