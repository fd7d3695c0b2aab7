"""lowbit under torch.distributed on the CPU (gloo): two real processes.

Each test starts two worker processes (this file run as a script, torchrun-style
environment: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), waits for them with a
timeout, kills them on failure, and compares what they wrote to a temp folder
with a single-process run computed here.
"""
import os

import pytest
import torch
import torch.nn as nn

import torch.distributed as dist

import gloo_procs

if __name__ != "__main__" and not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(os.path.dirname(HERE), "python")
WORLD = 2
STEPS = 20
GLOBAL_BATCH = 8
LR = 1e-2
TIMEOUT_S = 90


# ------------------------------------------------------------------ shared by workers and the reference

def build_model(lora_r=4, seed=0):
    import lowbit

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    lowbit.quantize_model(model, lora_r=lora_r, compute_dtype=torch.float32, progress=False)
    return model


def batches():
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g))
            for _ in range(STEPS)]


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def make_optimizer(model, min_8bit_size=0):
    import lowbit

    # min_8bit_size=0: the tiny adapters get blockwise 8-bit states too (the default keeps float32 below 4096).
    return lowbit.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  min_8bit_size=min_8bit_size)


def train_single(min_8bit_size=0):
    model = build_model()
    opt = make_optimizer(model, min_8bit_size)
    losses = []
    for x, y in batches():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), lora_state(model)


# ------------------------------------------------------------------ worker side (python test_distributed.py MODE OUTDIR)

def _worker_ddp(rank, out):
    import lowbit

    model = build_model()
    lowbit.distributed.check_consistent(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(ddp)
    per = GLOBAL_BATCH // WORLD
    losses = []
    for x, y in batches():
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = nn.functional.mse_loss(ddp(xs), ys)
        loss.backward()  # DDP averages the gradients: the gradient of the global-batch mean
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = loss.detach().clone()
        dist.all_reduce(g)  # the global-batch loss: mean of the equal-sized shards' means
        losses.append(g.item() / WORLD)
    adapter_dir = os.path.join(out, "adapter")
    if rank == 0:
        lowbit.save_adapter(ddp.module, adapter_dir)
    dist.barrier()
    fresh = build_model(seed=99)
    lowbit.load_adapter(fresh, adapter_dir)
    torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "lora": lora_state(ddp.module),
                "loaded": lora_state(fresh)}, os.path.join(out, f"rank{rank}.pt"))


def _worker_mismatch(rank, out):
    import lowbit

    messages = []
    # A rank converted with a different LoRA rank.
    try:
        lowbit.distributed.check_consistent(build_model(lora_r=4 if rank == 0 else 8))
    except ValueError as e:
        messages.append(str(e))
    # Same arguments, different base weights: DDP would broadcast rank 0's packed
    # codes but not the quant state (not a parameter or buffer), a silently mixed model.
    try:
        lowbit.distributed.check_consistent(build_model(seed=rank))
    except ValueError as e:
        messages.append(str(e))
    # And the same model passes.
    lowbit.distributed.check_consistent(build_model())
    torch.save(messages, os.path.join(out, f"rank{rank}.pt"))


def _worker_fsdp(rank, out):
    # FSDP2 shards the LoRA adapters and biases only. The packed uint8 weights
    # are passed as ignored_params and stay whole on every rank: fully_shard
    # re-wraps each sharded parameter as nn.Parameter(requires_grad=True), which
    # a uint8 tensor cannot be ("only Tensors of floating point dtype can require
    # gradients"), and their QuantState is not a parameter at all. Sharding the
    # 4-bit weights needs a tensor subclass with FSDP all-gather hooks (issue 7).
    # The optimizer keeps float32 states here (min_8bit_size large): its 8-bit
    # blocks would be each shard's own, so not the single-process layout.
    import lowbit
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    lowbit.distributed.check_consistent(model)
    for m in model.modules():
        if isinstance(m, lowbit.Linear4bit):
            fully_shard(m, ignored_params={m.weight})
    fully_shard(model, ignored_params={p for p in model.parameters() if p.dtype == torch.uint8})
    assert all(type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad)
    opt = make_optimizer(model, min_8bit_size=1 << 30)
    per = GLOBAL_BATCH // WORLD
    losses = []
    for x, y in batches():
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = loss.detach().clone()
        dist.all_reduce(g)
        losses.append(g.item() / WORLD)
    full = {k: v.full_tensor() for k, v in model.state_dict().items() if "lora_" in k}
    torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "lora": full}, os.path.join(out, f"rank{rank}.pt"))


# ------------------------------------------------------------------ test side

def _launch(mode, out):
    return gloo_procs.launch(__file__, mode, out, WORLD, TIMEOUT_S)



def assert_close_8bit(got, want, what):
    """DDP's gradient (the mean of the ranks' means) differs from the
    single-process one by float rounding, and with 8-bit optimizer states such
    a difference can move one element's m or v to the neighbouring code: that
    element's parameter then differs by a fraction of one update (lr = 1e-2).
    So: every element within 1e-3, and all but 1% of them within float
    tolerance."""
    diff = (got - want).abs()
    tight = diff <= 1e-6 + 1e-5 * want.abs()
    assert diff.max().item() <= 1e-3, f"{what}: max abs diff {diff.max().item():.3g}"
    assert int((~tight).sum()) <= max(1, want.numel() // 100), \
        f"{what}: {int((~tight).sum())} of {want.numel()} elements off (max abs diff {diff.max().item():.3g})"


def test_ddp_matches_single_process(tmp_path):
    ranks = _launch("ddp", tmp_path)
    losses, lora = train_single()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["losses"], losses, rtol=1e-5, atol=1e-7, msg=f"rank {r} loss curve")
        assert res["lora"].keys() == lora.keys()
        for k in lora:
            assert_close_8bit(res["lora"][k], lora[k], f"rank {r} {k}")
            # What rank 0 saved loads back exactly, on every rank.
            assert torch.equal(res["loaded"][k], ranks[0]["lora"][k]), f"rank {r}: loaded {k} differs"
    assert losses[-1] < losses[0]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k)
    for k in lora:  # the replicas are bitwise identical
        assert torch.equal(ranks[0]["lora"][k], ranks[1]["lora"][k]), k


def test_check_consistent_rejects_mismatched_ranks(tmp_path):
    ranks = _launch("mismatch", tmp_path)
    for r, messages in enumerate(ranks):
        assert len(messages) == 2, f"rank {r} raised {len(messages)} of 2 errors: {messages}"
        lora_msg, weights_msg = messages
        assert "rank 1 differs from rank 0" in lora_msg and "layer 0" in lora_msg
        assert "r=4" in lora_msg and "r=8" in lora_msg
        assert "quant_state" in weights_msg
    assert ranks[0] == ranks[1]  # every rank raises the same error


def test_fully_shard_lora_matches_single_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    ranks = _launch("fsdp", tmp_path)
    losses, lora = train_single(min_8bit_size=1 << 30)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["losses"], losses, rtol=1e-5, atol=1e-7, msg=f"rank {r} loss curve")
        for k in lora:
            torch.testing.assert_close(res["lora"][k], lora[k], rtol=1e-5, atol=1e-6, msg=f"rank {r} {k}")


if __name__ == "__main__":
    gloo_procs.run_worker({"ddp": _worker_ddp, "mismatch": _worker_mismatch, "fsdp": _worker_fsdp})
