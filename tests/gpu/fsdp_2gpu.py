"""FSDP2 with sharded 4-bit weights on 2 GPUs (NCCL): the equivalence checks of
tests/test_fsdp.py, on CUDA.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 tests/gpu/fsdp_2gpu.py [--out DIR]

Each rank trains the tiny model of tests/test_fsdp.py sharded over both GPUs and,
alone on its GPU, the same model unsharded; it checks the gradients, the 20-step
loss curve, uint8 all-gathers, the 1/2 shards and that the gathered checkpoint
is byte-identical to the single-GPU one; then the same training with FSDP2 CPU
offload (shard_model(cpu_offload=True): shards in pinned host memory, the
optimizer on the host) must give the non-offloaded 20-step loss curve within
1e-3 relative and the same checkpoint. Prints PASS or FAIL per rank (JSON under --out).
The benchmark (Llama-2-7B shapes) is benchmarks/bench_fsdp.py.
"""
import argparse
import json
import os
import sys

# NVLink multicast off, here and in anything started from here.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "python"))
sys.path.insert(0, os.path.dirname(HERE))

import lowbit  # noqa: E402
import test_fsdp as T  # noqa: E402  (the model, batches and helpers of the CPU test)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 tests/gpu/fsdp_2gpu.py")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    per = T.GLOBAL_BATCH // world
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    # Single-GPU reference, on this rank's GPU.
    ref = T.build_model().to(dev)
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    x0, y0 = [t.to(dev) for t in T.batches()[0]]
    nn.functional.mse_loss(ref(x0), y0).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    ref.zero_grad(set_to_none=True)
    opt = T.make_optimizer(ref)
    ref_losses = []
    for x, y in T.batches():
        x, y = x.to(dev), y.to(dev)
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(loss.item())

    # Sharded.
    model = T.build_model().to(dev)
    log = []
    T._count_all_gathers(log)
    lowbit.distributed.shard_model(model)
    shards = T._shard_bytes(model)
    for name, (loc, full) in shards.items():
        rows = full // 8452
        check(loc == (min(rows, -(-rows // world) * (rank + 1)) - min(rows, -(-rows // world) * rank)) * 8452,
              f"{name}: local shard {loc} bytes of {full}")
    log.clear()
    loss = nn.functional.mse_loss(model(x0[rank * per:(rank + 1) * per]), y0[rank * per:(rank + 1) * per])
    loss.backward()
    check(log and all(d == "torch.uint8" for d, _ in log), f"all-gathers not all uint8: {log}")
    gather_bytes = sum(b for _, b in log)
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor()
            check(torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5),
                  f"grad {n}: max diff {(g - ref_grads[n]).abs().max().item():.3g}")
    model.zero_grad(set_to_none=True)
    opt = T.make_optimizer(model)
    losses = T.train_sharded(model, opt, rank, world, dev)
    diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, ref_losses))
    check(diff < 1e-3, f"loss curve differs from single GPU by {diff:.3g} (relative)")
    full = lowbit.distributed.full_state_dict(model, rank0_only=False)
    check(list(full) == list(ref_sd), "checkpoint keys differ")
    for k, v in ref_sd.items():
        if "lora_" not in k:
            check(torch.equal(full[k], v.cpu()), f"checkpoint {k} not byte-identical")
    fresh = T.build_model(seed=7).to(dev)
    lowbit.distributed.shard_model(fresh)
    lowbit.distributed.load_full_state_dict(fresh, full)
    again = lowbit.distributed.full_state_dict(fresh, rank0_only=False)
    check(all(torch.equal(again[k], full[k]) for k in full), "load_full_state_dict did not round-trip")

    # FSDP2 CPU offload (shard_model(cpu_offload=True)): the same 20 steps with
    # every shard (packed records, LoRA, head) in pinned host memory, copied to
    # the GPU for each all-gather; gradients come back to the host and the
    # optimizer steps there.
    off_losses, off_diff = [], None
    try:
        off = T.build_model().to(dev)
        lowbit.distributed.shard_model(off, cpu_offload=True)
        off_losses = T.train_sharded(off, T.make_optimizer(off), rank, world, dev)
        flags = T._offload_flags(off)
        check(flags and all(f == (True, "cpu") for f in flags.values()),
              f"offload: shards not all on the host: {flags}")
        unpinned = [n for n, p in off.named_parameters() if not p.to_local().is_pinned()]
        check(not unpinned, f"offload: shards not pinned: {unpinned}")
        off_diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(off_losses, losses))
        check(off_diff < 1e-3, f"offload: loss curve differs from the unoffloaded run by {off_diff:.3g} (relative)")
        off_full = lowbit.distributed.full_state_dict(off, rank0_only=False)
        check(list(off_full) == list(full), "offload: checkpoint keys differ")
        for k, v in full.items():
            if "lora_" in k:
                check(torch.allclose(off_full[k], v, rtol=1e-3, atol=1e-5), f"offload: checkpoint {k} differs")
            else:
                check(torch.equal(off_full[k], v), f"offload: checkpoint {k} not byte-identical")
        fresh = T.build_model(seed=7).to(dev)
        lowbit.distributed.shard_model(fresh, cpu_offload=True)
        lowbit.distributed.load_full_state_dict(fresh, full)
        again = lowbit.distributed.full_state_dict(fresh, rank0_only=False)
        check(all(torch.equal(again[k], full[k]) for k in full), "offload: load_full_state_dict did not round-trip")
    except Exception as e:  # report it with the other checks instead of leaving the other rank in a collective
        check(False, f"offload: {type(e).__name__}: {e}")

    res = dict(rank=rank, world=world, card=torch.cuda.get_device_name(dev), losses=losses, ref_losses=ref_losses,
               max_rel_loss_diff=diff, all_gather_bytes_first_step=gather_bytes, shards=shards,
               offload_losses=off_losses, offload_max_rel_loss_diff=off_diff, failures=failures)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"fsdp_2gpu_rank{rank}.json"), "w") as f:
            json.dump(res, f, indent=1)
    flags = torch.tensor([len(failures)], device=dev)
    dist.all_reduce(flags)
    off_txt = "n/a" if off_diff is None else f"{off_diff:.2e}"
    print(f"rank {rank}: {'PASS' if not failures else 'FAIL'} (max relative loss diff {diff:.2e} against one GPU, "
          f"{off_txt} offloaded against not)"
          + "".join(f"\n  {f}" for f in failures), flush=True)
    dist.destroy_process_group()
    sys.exit(0 if int(flags.item()) == 0 else 1)


if __name__ == "__main__":
    main()
