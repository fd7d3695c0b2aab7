"""QLoRA training of a Llama-2-7B-shaped model under FSDP2: lowbit and bitsandbytes + PEFT,
1 GPU (plain) against N GPUs (fully_shard per decoder layer), optionally with CPU offload.

    python benchmarks/bench_fsdp.py --out DIR [--impl lowbit,bnb] [--gpus 1,2] [--cpu-offload]
                                    [--layers 32] [--steps 6] [--timeout 300]
    python benchmarks/bench.py --mode fsdp -- --out DIR
    python benchmarks/bench_fsdp.py --tiny --gpus 2 --out DIR     # CPU (gloo), tiny shapes: the code path only

Model: random weights; hidden 4096, intermediate 11008, 32 layers, 32 heads,
vocab 32000; LoRA r=16, alpha 32, dropout 0.05 on q, k, v, o, gate, up, down
(fp32 adapters); activation checkpointing per layer; batch 2 x 2048 tokens per
GPU; lr 1e-4. Layers are built and quantized one at a time on the GPU, so no
rank ever holds the whole model in bf16. Implementations (--impl):

  lowbit  lowbit.quantize_model (NF4, double quant) + lowbit.distributed.shard_model
          (the packed 4-bit records are sharded and all-gathered as uint8) +
          lowbit.optim.PagedAdamW8bit on the local shards.
  bnb     bitsandbytes nn.Linear4bit (NF4, double quant, bnb_4bit_quant_storage
          bfloat16: --bnb-storage) + peft LoRA (adapters upcast to fp32, as
          peft.get_peft_model does) + fully_shard on each decoder layer and the root +
          bitsandbytes PagedAdamW8bit. FSDP2 cannot shard uint8 storage (it
          wraps each shard in nn.Parameter(requires_grad=True), which integer
          tensors refuse), so bf16 storage is the only one that runs; --bnb-storage
          uint8 shows the error. bitsandbytes' optimizers cannot step on FSDP2's
          DTensor parameters (their ops get DTensors mixed with plain state
          tensors, or have no DTensor sharding rule); when the
          first step raises that, the run goes on with torch.optim.AdamW and the
          row says so (--bnb-optim adamw starts with it). One GPU: no FSDP2, the
          plain bitsandbytes + PEFT QLoRA setup.
  --impl auto (the default): both when bitsandbytes and peft import and
  bitsandbytes quantizes on the device, else lowbit with a note.

--cpu-offload adds, for lowbit at each GPU count (one GPU included: fully_shard
over one rank), a run with FSDP2's CPUOffloadPolicy: the sharded parameters
(packed records, LoRA) and their gradients live in pinned host memory, each
layer's shard is copied to the GPU for its all-gather, and the optimizer steps
on the host (OMP_NUM_THREADS = cores / ranks).

Every configuration runs under torchrun in a process group of its own, with a
wall-clock limit (--timeout): bitsandbytes is known to fail under FSDP
(bitsandbytes #1633, accelerate #3983: illegal memory accesses, silent NaN
gradients), and a failure must neither hang nor end this script. Each rank
appends one JSON line per step (loss, global gradient norm, both finite?) to
DIR/<config>_rank<r>.steps.jsonl, and the table reports per configuration:
"ran", "NaN at step k" (first step, warm-up included, whose loss or gradient
norm was not finite), "crashed at step k: <the exception's last line>" or
"timed out after N s"; logs in DIR/<config>.log.

Reported per configuration: tokens/s (all GPUs together and per GPU), peak GPU
memory per GPU (torch.cuda.max_memory_allocated: the paged optimizers' managed
memory is not in it), peak host memory per rank (max RSS), the bytes each rank
all-gathers per training step, and the median step time. NVLink multicast is
off in every process started (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1).
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(os.path.dirname(HERE), "python")
sys.path.insert(0, PYTHON_DIR)

SEVEN_B = dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000)
TINY = dict(hidden=64, inter=176, layers=2, heads=4, vocab=256)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = dict(r=16, alpha=32.0, dropout=0.05)
LR = 1e-4
IMPLS = ("lowbit", "bnb")
GIB = 2**30


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


def bnb_convert(layer, device, storage):
    """The layer's seven projections as bitsandbytes Linear4bit (NF4, double
    quant), quantized on `device`; `module=` lets bitsandbytes restore the quant
    state after FSDP2 has replaced the parameter object."""
    import bitsandbytes as bnb

    for name in TARGETS:
        lin = getattr(layer, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", quant_storage=storage, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     blocksize=64, quant_storage=storage, module=q).to(device)
        setattr(layer, name, q)
        del lin


class Llama(nn.Module):
    def __init__(self, shape, layers, device, impl="lowbit", bnb_storage=torch.bfloat16):
        super().__init__()
        h, self.heads = shape["hidden"], shape["heads"]
        self.embed = nn.Embedding(shape["vocab"], h, device=device, dtype=torch.bfloat16)
        self.layers = nn.ModuleList()
        for _ in range(layers):  # one bf16 layer at a time, quantized at once
            layer = Layer(h, shape["inter"], self.heads, device)
            if impl == "lowbit":
                import lowbit

                lowbit.quantize_model(layer, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                      target_modules=TARGETS, progress=False)
            else:
                bnb_convert(layer, device, bnb_storage)
            self.layers.append(layer)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.norm = RMSNorm(h, device)
        self.lm_head = nn.Linear(h, shape["vocab"], bias=False, device=device, dtype=torch.bfloat16)
        self.embed.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        if impl == "bnb":
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                               target_modules=list(TARGETS)), self)
            # peft gives the adapters the storage dtype (bf16); get_peft_model's
            # default (autocast_adapter_dtype) makes them fp32, like lowbit's.
            for n, p in self.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()

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

def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _is_device_error(e: BaseException) -> bool:
    """A CUDA error leaves the context unusable: nothing more can run in this process."""
    return isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e) or "CUBLAS" in str(e)


class Progress:
    """One JSON line per event, flushed at once, so what a rank did survives it being killed."""

    def __init__(self, path):
        self.f = open(path, "w", buffering=1)

    def write(self, **event):
        self.f.write(json.dumps(event) + "\n")
        self.f.flush()


def shard_bnb(model, mesh, cpu_offload):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw = dict(mesh=mesh)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    for layer in model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def make_optimizer(impl, params, bnb_optim, device):
    if impl == "lowbit":
        import lowbit

        return lowbit.optim.PagedAdamW8bit(params, lr=LR), "lowbit PagedAdamW8bit"
    if bnb_optim == "paged8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=LR), "bnb PagedAdamW8bit"
    return torch.optim.AdamW(params, lr=LR, foreach=True), "torch AdamW"


def grad_norm(params, comm_device, distributed):
    """The global L2 norm of the gradients: sum of squares of this rank's
    (local) shards, all-reduced; float('nan') when any is not finite."""
    import torch.distributed as dist

    by_dev = {}
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        by_dev.setdefault(g.device, []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=comm_device)
    for gs in by_dev.values():
        norms = torch._foreach_norm(gs)
        sq += torch.stack(norms).double().pow(2).sum().to(comm_device)
    if distributed:
        dist.all_reduce(sq)
    return math.sqrt(sq.item()) if math.isfinite(sq.item()) else float("nan")


def worker(args):
    rank = int(os.environ.get("RANK", 0))
    prog = Progress(os.path.join(args.out, f"{args.tag}_rank{rank}.steps.jsonl"))
    try:
        train(args, rank, prog)
    except BaseException as e:
        prog.write(event="error", error=_one_line(e))
        raise


def train(args, rank, prog):
    import resource
    from datetime import timedelta

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = not args.tiny
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if cuda else (lambda *a: None)
    fsdp = world > 1 or args.cpu_offload
    if fsdp:
        kw = {"device_id": dev} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.collective_timeout), **kw)
    shape = TINY if args.tiny else SEVEN_B
    layers = args.layers or shape["layers"]
    storage = {"bf16": torch.bfloat16, "uint8": torch.uint8}[args.bnb_storage]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Llama(shape, layers, dev, args.impl, storage)
    build_s = time.perf_counter() - t0
    prog.write(event="built", build_s=round(build_s, 2))
    log = []
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        orig = dist.all_gather_into_tensor

        def counting(output_tensor, input_tensor, group=None, async_op=False):
            log.append(output_tensor.numel() * output_tensor.element_size())
            return orig(output_tensor, input_tensor, group=group, async_op=async_op)

        dist.all_gather_into_tensor = counting
        mesh = init_device_mesh(dev.type, (world,))
        if args.impl == "lowbit":
            import lowbit

            lowbit.distributed.shard_model(model, mesh=mesh, cpu_offload=args.cpu_offload)
        else:
            shard_bnb(model, mesh, args.cpu_offload)
    if cuda:
        torch.cuda.empty_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, opt_name = make_optimizer(args.impl, params, args.bnb_optim, dev)
    note = ""
    trainable = sum(p.numel() for p in params)
    prog.write(event="setup", optimizer=opt_name, trainable_params=trainable)
    g = torch.Generator(device=dev).manual_seed(rank)
    vocab = shape["vocab"]
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), device=dev, generator=g)

    def opt_step(first):
        nonlocal opt, opt_name, note
        try:
            opt.step()
        except Exception as e:
            # bitsandbytes' optimizers on DTensor parameters raise here (no sharding
            # rule for their ops); the gradients are intact, so go on with torch AdamW.
            if not first or args.impl != "bnb" or opt_name == "torch AdamW" or _is_device_error(e):
                raise
            note = f"{opt_name} failed at its first step ({_one_line(e)}); torch AdamW used instead"
            prog.write(event="optimizer_fallback", error=_one_line(e))
            opt, opt_name = torch.optim.AdamW(params, lr=LR, foreach=True), "torch AdamW"
            opt.step()

    times, losses, norms = [], [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            log.clear()
        sync()
        t = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        del logits
        loss.backward()
        gn = grad_norm(params, dev, fsdp)
        opt_step(i == 0)
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t
        lv = loss.item()
        prog.write(event="step", step=i + 1, loss=lv, grad_norm=gn, finite=math.isfinite(lv) and math.isfinite(gn),
                   s=round(dt, 4), timed=i >= args.warmup)
        if i >= args.warmup:
            times.append(dt)
            losses.append(lv)
            norms.append(gn)
    med = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    res = dict(
        impl=args.impl, world=world, rank=rank, card=torch.cuda.get_device_name(dev) if cuda else "cpu",
        layers=layers, batch=args.batch, seq=args.seq, sharded=fsdp, cpu_offload=args.cpu_offload,
        bnb_storage=args.bnb_storage if args.impl == "bnb" else None, optimizer=opt_name, note=note,
        build_s=round(build_s, 1), step_s_median=med, tokens_per_s_total=tokens * world / med,
        tokens_per_s_per_gpu=tokens / med, peak_mem_gib=torch.cuda.max_memory_allocated(dev) / GIB if cuda else None,
        host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        all_gather_bytes_per_step=sum(log) / args.steps if fsdp else 0, losses=losses, grad_norms=norms,
        trainable_params=trainable,
    )
    if args.impl == "lowbit":
        import lowbit

        res["optimizer_state_bytes"] = lowbit.optim.state_bytes(opt)
    with open(os.path.join(args.out, f"{args.tag}_rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if rank == 0:
        print(json.dumps(res), flush=True)
    if fsdp:
        dist.destroy_process_group()


# ---------------------------------------------------------------- launcher

_EXC = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")
_DEVICE = re.compile(r"(CUDA error: .*|.*illegal memory access.*|NCCL error.*|Signal \d+ \(SIG\w+\) received.*)")
_NOISE = ("ChildFailedError", "torch.distributed.elastic")


def last_error_line(text: str) -> str:
    """The line that says what went wrong in a torchrun log: the first
    exception line (a traceback's last line) of any rank, else a CUDA/NCCL
    error or a fatal signal, else the last non-empty line."""
    lines = [re.sub(r"^\[(?:default)?rank\d+\]:", "", ln).rstrip() for ln in text.splitlines()]
    for ln in lines:
        if _EXC.match(ln) and not any(n in ln for n in _NOISE):
            return ln
    for ln in lines:
        m = _DEVICE.search(ln)
        if m:
            return m.group(1).strip()
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else ""


def read_events(path):
    events = []
    try:
        with open(path) as f:
            for ln in f:
                try:
                    events.append(json.loads(ln))
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
    except FileNotFoundError:
        pass
    return events


def classify(returncode, timed_out, events_by_rank, log_text, timeout_s):
    """(status, first non-finite step or None, steps every rank finished, error line)."""
    steps = [[e for e in ev if e.get("event") == "step"] for ev in events_by_rank]
    done = min((len(s) for s in steps), default=0)
    bad = [e["step"] for s in steps for e in s if not e.get("finite", False)]
    first_nan = min(bad) if bad else None
    errors = [e["error"] for ev in events_by_rank for e in ev if e.get("event") == "error"]
    error = errors[0] if errors else (last_error_line(log_text) if returncode else "")
    nan = f", NaN at step {first_nan}" if first_nan is not None else ""
    if timed_out:
        return f"timed out after {timeout_s:.0f} s (at step {done}{nan})", first_nan, done, error
    if returncode != 0:
        return f"crashed at step {done}{nan}: {error or f'exit code {returncode}'}", first_nan, done, error
    if first_nan is not None:
        return f"NaN at step {first_nan}", first_nan, done, error
    return "ran", None, done, error


def _kill_group(proc):
    """SIGTERM, then SIGKILL, to the process group `proc` leads (torchrun and its workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; make sure no worker outlived it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def run_group(cmd, env, log_path, timeout_s):
    """Runs `cmd` as the leader of a new process group, output to log_path;
    (returncode, timed_out). On timeout (or an interrupt) the whole group is killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return proc.returncode, True
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            else:  # stragglers of a group whose leader exited
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def child_env(args, nproc, offload):
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (PYTHON_DIR, os.environ.get("PYTHONPATH")) if p))
    if args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: containers' hostnames may not resolve
    elif offload and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))  # the optimizer steps on the host
    return env


def run_config(args, impl, n, offload):
    tag = f"{impl}_w{n}" + ("_offload" if offload else "")
    for r in range(n):  # results of an earlier run must not pass for this one's
        for suffix in (".json", ".steps.jsonl"):
            path = os.path.join(args.out, f"{tag}_rank{r}{suffix}")
            if os.path.exists(path):
                os.remove(path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.abspath(__file__), "--worker", "--tag", tag, "--impl", impl, "--out", args.out,
           "--layers", str(args.layers or 0), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--bnb-storage", args.bnb_storage,
           "--bnb-optim", args.bnb_optim, "--collective-timeout", str(args.collective_timeout)]
    if offload:
        cmd.append("--cpu-offload")
    if args.tiny:
        cmd.append("--tiny")
    log_path = os.path.join(args.out, f"{tag}.log")
    print(f"running {tag}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc, timed_out = run_group(cmd, child_env(args, n, offload), log_path, args.timeout)
    wall = time.perf_counter() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    events = [read_events(os.path.join(args.out, f"{tag}_rank{r}.steps.jsonl")) for r in range(n)]
    status, first_nan, done, error = classify(rc, timed_out, events, text, args.timeout)
    setup = next((e for ev in events for e in ev if e.get("event") == "setup"), {})
    fallback = next((e for ev in events for e in ev if e.get("event") == "optimizer_fallback"), None)
    row = dict(config=tag, impl=impl, gpus=n, cpu_offload=offload, status=status, first_nan_step=first_nan,
               steps_done=done, error=error, wall_s=round(wall, 1), log=log_path,
               bnb_storage=args.bnb_storage if impl == "bnb" else None,
               optimizer=("torch AdamW" if fallback else setup.get("optimizer")),
               optimizer_note=(f"{setup.get('optimizer')} failed at its first step ({fallback['error']}); "
                               f"torch AdamW used instead") if fallback else "")
    ranks = []
    for r in range(n):
        try:
            with open(os.path.join(args.out, f"{tag}_rank{r}.json")) as f:
                ranks.append(json.load(f))
        except (FileNotFoundError, json.JSONDecodeError):
            break
    if not timed_out and rc == 0 and len(ranks) == n:
        peaks = [x["peak_mem_gib"] for x in ranks if x["peak_mem_gib"] is not None]
        row.update(card=ranks[0]["card"], tokens_per_s_total=min(x["tokens_per_s_total"] for x in ranks),
                   tokens_per_s_per_gpu=min(x["tokens_per_s_per_gpu"] for x in ranks),
                   peak_mem_gib_per_gpu=max(peaks) if peaks else None,
                   host_rss_gib_per_rank=max(x["host_peak_rss_gib"] for x in ranks),
                   all_gather_gib_per_step_per_rank=max(x["all_gather_bytes_per_step"] for x in ranks) / GIB,
                   step_s=max(x["step_s_median"] for x in ranks), trainable_params=ranks[0]["trainable_params"],
                   losses=ranks[0]["losses"], grad_norms=ranks[0]["grad_norms"])
    print(f"  {tag}: {status} ({wall:.0f} s)", flush=True)
    return row


def probe_bnb(tiny, timeout_s=180):
    """None when bitsandbytes and peft import and bitsandbytes quantizes and
    multiplies a 4-bit layer on the device the run would use; else the reason."""
    dev = "cpu" if tiny else "cuda"
    code = (
        "import torch, bitsandbytes as bnb, peft\n"
        f"dev = torch.device({dev!r})\n"
        "q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type='nf4', "
        "quant_storage=torch.bfloat16, device='meta')\n"
        "q.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False, "
        "quant_type='nf4', quant_storage=torch.bfloat16, module=q).to(dev)\n"
        "y = q(torch.randn(2, 64, dtype=torch.bfloat16, device=dev))\n"
        "assert torch.isfinite(y).all()\n"
        "print('bnb', bnb.__version__, 'peft', peft.__version__)\n"
    )
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if tiny else {}))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"the bitsandbytes probe timed out after {timeout_s} s"
    if r.returncode != 0:
        return last_error_line(r.stdout + r.stderr) or f"exit code {r.returncode}"
    return None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    print("\n| impl | GPUs | CPU offload | optimizer | status | tokens/s | tokens/s per GPU | peak GiB per GPU "
          "| host GiB per rank | all-gather GiB/step | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        impl = r["impl"] + (f" ({r['bnb_storage']} storage)" if r.get("bnb_storage") else "")
        print(f"| {impl} | {r['gpus']} | {'yes' if r['cpu_offload'] else 'no'} | {r.get('optimizer') or '-'} "
              f"| {r['status']} | {fmt(r.get('tokens_per_s_total'), '.0f')} "
              f"| {fmt(r.get('tokens_per_s_per_gpu'), '.0f')} "
              f"| {fmt(r.get('peak_mem_gib_per_gpu'), '.2f')} | {fmt(r.get('host_rss_gib_per_rank'), '.2f')} "
              f"| {fmt(r.get('all_gather_gib_per_step_per_rank'), '.2f')} | {fmt(r.get('step_s'), '.2f')} |")
    for r in rows:
        if r.get("optimizer_note"):
            print(f"\n{r['config']}: {r['optimizer_note']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_fsdp_out")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--impl", default="auto", help="comma-separated: lowbit, bnb; or auto (both when bnb+peft work)")
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated (--tiny: CPU processes)")
    ap.add_argument("--cpu-offload", action="store_true",
                    help="also run lowbit with FSDP2 CPU offload at each GPU count (in the worker: offload this run)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (gloo): checks the code path")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny 2)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per GPU (default 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --tiny 1)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 300; --tiny 120)")
    ap.add_argument("--collective-timeout", type=int, default=180, help="process group timeout, seconds")
    ap.add_argument("--bnb-storage", choices=("bf16", "uint8"), default="bf16",
                    help="bnb_4bit_quant_storage of the bitsandbytes weights (FSDP2 shards bf16 only)")
    ap.add_argument("--bnb-optim", choices=("paged8bit", "adamw"), default="paged8bit",
                    help="bitsandbytes PagedAdamW8bit (torch AdamW when it raises at the first step) or torch AdamW")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, full, tiny in (("batch", 2, 2), ("seq", 2048, 32), ("steps", 6, 2), ("warmup", 2, 1),
                          ("timeout", 300.0, 120.0)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_fsdp needs CUDA GPUs (or --tiny for the CPU code path)")
    notes = []
    wanted = [s.strip() for s in args.impl.split(",") if s.strip()]
    auto = wanted == ["auto"]
    impls = list(IMPLS) if auto else wanted
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        sys.exit(f"--impl: unknown {bad}; choose from {', '.join(IMPLS)} or auto")
    if "bnb" in impls:
        why = probe_bnb(args.tiny)
        if why is not None:
            notes.append(f"bnb skipped: {why}")
            impls.remove("bnb")
            if not auto:
                print(f"note: {notes[-1]}", flush=True)
    if not impls:
        sys.exit("nothing to run: " + "; ".join(notes))
    counts = [int(s) for s in args.gpus.split(",")]
    rows = []
    for n in counts:
        if not args.tiny and n > torch.cuda.device_count():
            notes.append(f"{n} GPUs skipped: only {torch.cuda.device_count()} visible")
            continue
        for impl in impls:
            rows.append(run_config(args, impl, n, False))
        if args.cpu_offload and "lowbit" in impls:
            rows.append(run_config(args, "lowbit", n, True))
    print_table(rows)
    for note in notes:
        print(f"note: {note}")
    summary = dict(rows=rows, notes=notes, tiny=args.tiny, batch=args.batch, seq=args.seq, steps=args.steps,
                   warmup=args.warmup, layers=args.layers or (TINY if args.tiny else SEVEN_B)["layers"], lora=LORA)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
