"""FSDP2 (fully_shard) with the 4-bit weights sharded, on the CPU (gloo): two real processes.

Like test_distributed.py: each test starts two worker processes (this file run as
a script with a torchrun-style environment), waits for them with a timeout,
kills them on failure, and compares what they wrote with a single-process run
computed here. The model has layers whose records split evenly over two ranks,
layers with an odd number of records (FSDP2 pads the last rank's shard), a
partial last record, a layer of one record (rank 1's shard is empty), and a
plain (unquantized, frozen) head.
"""
import os

import pytest
import torch
import torch.nn as nn

import torch.distributed as dist

import gloo_procs

if __name__ != "__main__":
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
    from torch.distributed import fsdp as _fsdp

    if not hasattr(_fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(os.path.dirname(HERE), "python")
WORLD = 2
STEPS = 20
GLOBAL_BATCH = 8
LR = 1e-2
TIMEOUT_S = 120


# ------------------------------------------------------------------ shared by workers and the reference

class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    # At blocksize 64 with double quantization a record holds 16384 weights:
    # inp 4096 weights -> 1 record; layers.0 32768 -> 2 (even split);
    # layers.1 36864 -> 3 records, the last one partial (odd: FSDP2 pads rank 1).
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 128)
        self.layers = nn.ModuleList([Block(128, 256), Block(128, 288)])
        self.head = nn.Linear(128, 16)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_model(lora_r=4, seed=0, convert=True):
    import lowbit

    torch.manual_seed(seed)
    model = Tiny()
    if convert:
        lowbit.quantize_model(model, lora_r=lora_r, compute_dtype=torch.float32, skip_modules=("head",),
                              progress=False)
    return model


def batches():
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g))
            for _ in range(STEPS)]


def make_optimizer(model, min_8bit_size=1 << 30, paged=False):
    import lowbit

    cls = lowbit.optim.PagedAdamW8bit if paged else lowbit.optim.AdamW8bit
    return cls([p for p in model.parameters() if p.requires_grad], lr=LR, min_8bit_size=min_8bit_size)


def train_single():
    model = build_model()
    x, y = batches()[0]
    nn.functional.mse_loss(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model)
    losses = []
    for x, y in batches():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), grads, model.state_dict()


# ------------------------------------------------------------------ worker side (python test_fsdp.py MODE OUTDIR)

def _count_all_gathers(log):
    """Wraps dist.all_gather_into_tensor (what FSDP2's default all-gather calls) to log (dtype, output bytes)."""
    orig = dist.all_gather_into_tensor

    def counting(output_tensor, input_tensor, group=None, async_op=False):
        log.append((str(output_tensor.dtype), output_tensor.numel() * output_tensor.element_size()))
        return orig(output_tensor, input_tensor, group=group, async_op=async_op)

    dist.all_gather_into_tensor = counting


def _shard_bytes(model):
    """{param name: (local bytes, full bytes)} of the packed 4-bit weights."""
    import lowbit
    from lowbit.nn.packed_weight import packed_local

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, lowbit.Linear4bit):
            local = packed_local(m.weight)
            L = local.record_layout
            out[name + ".weight"] = (local.records().numel(), L.num_records * L.record_bytes)
    return out


def _expected_gather_bytes(model, world):
    """Bytes one all-gather of each FSDP2 group moves: world x the padded shards of its parameters."""
    from torch.distributed.fsdp import FSDPModule

    from lowbit.nn.packed_weight import packed_local

    per_group = {}
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        total = 0
        for p in m.parameters():
            owned = [mm for mm in m.modules() if isinstance(mm, FSDPModule) and mm is not m]
            if any(any(q is p for q in mm.parameters()) for mm in owned):
                continue  # belongs to an inner group
            local = packed_local(p)
            rows = -(-p.shape[0] // world)
            if local is not None:
                total += rows * p.shape[1]
            else:
                total += rows * (p[0].numel() if p.dim() > 1 else 1) * p.element_size()
        per_group[name or "<root>"] = total * world
    return per_group


def train_sharded(model, opt, rank, world=WORLD, device=None):
    """The steps of batches() on this rank's slice of each global batch; the
    mean loss over the ranks per step."""
    per = GLOBAL_BATCH // world
    losses = []
    for x, y in batches():
        if device is not None:
            x, y = x.to(device), y.to(device)
        loss = nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = loss.detach().clone()
        dist.all_reduce(g)
        losses.append(g.item() / world)
    return losses


def _worker_train(rank, out):
    import lowbit

    model = build_model()
    ref_packed = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and v.dtype == torch.uint8}
    log = []
    _count_all_gathers(log)
    lowbit.distributed.shard_model(model)
    shards = _shard_bytes(model)
    expected_groups = _expected_gather_bytes(model, WORLD)
    per = GLOBAL_BATCH // WORLD

    # One forward/backward: loss and (reduce-scattered) gradients.
    x, y = batches()[0]
    log.clear()
    loss = nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
    loss.backward()
    step_gathers = list(log)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    opt = make_optimizer(model)
    losses = train_sharded(model, opt, rank)
    assert all(type(s["state1"]).__name__ == "Tensor" for s in opt.state.values())

    full = lowbit.distributed.full_state_dict(model)
    # The checkpoint loads back into a freshly sharded model and gathers to the same bytes.
    fresh = build_model(seed=7)
    lowbit.distributed.shard_model(fresh)
    sd0 = [full if rank == 0 else None]
    dist.broadcast_object_list(sd0, src=0)
    lowbit.distributed.load_full_state_dict(fresh, sd0[0])
    again = lowbit.distributed.full_state_dict(fresh, rank0_only=False)
    reloaded_equal = list(again) == list(sd0[0]) and all(torch.equal(again[k], sd0[0][k]) for k in again)
    # And so does this rank's own (sharded) state dict, into the same sharding.
    fresh2 = build_model(seed=8)
    lowbit.distributed.shard_model(fresh2)
    fresh2.load_state_dict(model.state_dict())
    again2 = lowbit.distributed.full_state_dict(fresh2, rank0_only=False)
    sharded_reload_equal = all(torch.equal(again2[k], sd0[0][k]) for k in again2)
    # FSDP2 CPU offload: the same training with the shards held by the host.
    off = build_model()
    lowbit.distributed.shard_model(off, cpu_offload=True)
    off_losses = train_sharded(off, make_optimizer(off), rank)
    offloaded = _offload_flags(off)  # after a step: FSDP2 names its parameters at the first forward
    off_full = lowbit.distributed.full_state_dict(off, rank0_only=False)
    torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "grads": grads, "full": full,
                "shards": shards, "gathers": step_gathers, "expected_groups": expected_groups,
                "ref_packed": ref_packed, "reloaded_equal": reloaded_equal,
                "sharded_reload_equal": sharded_reload_equal,
                "offload": {"losses": torch.tensor(off_losses, dtype=torch.float64), "flags": offloaded,
                            "full": off_full}}, os.path.join(out, f"rank{rank}.pt"))


def _offload_flags(model):
    """{param name: (FSDP2 offloads it, its shard's device type)} for every sharded parameter."""
    from torch.distributed.fsdp import FSDPModule

    flags = {}
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            group = mod._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group is not None else []):
                flags[fp._param_fqn] = (fp.offload_to_cpu, fp.sharded_param.device.type)
    return flags


def _worker_optim8(rank, out):
    # 8-bit (and paged: on the CPU the same as unpaged) states on the local adapter shards.
    import lowbit

    res = {}
    for paged in (False, True):
        model = build_model()
        lowbit.distributed.shard_model(model)
        opt = make_optimizer(model, min_8bit_size=0, paged=paged)
        losses = train_sharded(model, opt, rank)
        states = [(tuple(p.to_local().shape), s["state1"].dtype, tuple(s["state1"].shape))
                  for group in opt.param_groups for p in group["params"] for s in [opt.state[p]]]
        res[paged] = {"losses": losses, "states": states}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def _worker_bad(rank, out):
    import lowbit
    from torch.distributed.device_mesh import DeviceMesh

    messages = {}
    try:
        lowbit.distributed.shard_model(build_model(convert=False))
    except ValueError as e:
        messages["unconverted"] = str(e)
    try:
        lowbit.distributed.shard_model(build_model(lora_r=4 if rank == 0 else 8))
    except ValueError as e:
        messages["mismatch"] = str(e)
    # A rank-local (sharded) state dict saved at world size 2, loaded where each
    # rank shards over itself only (world size 1).
    model = build_model()
    lowbit.distributed.shard_model(model)
    sharded_sd = model.state_dict()
    full = lowbit.distributed.full_state_dict(model, rank0_only=False)
    groups = [dist.new_group([r]) for r in range(WORLD)]
    solo = DeviceMesh.from_group(groups[rank], "cpu")
    other = build_model(seed=5)
    lowbit.distributed.shard_model(other, mesh=solo)
    try:
        other.load_state_dict(sharded_sd)
    except ValueError as e:
        messages["world"] = str(e)
    # The full state dict loads at any world size.
    lowbit.distributed.load_full_state_dict(other, full)
    again = lowbit.distributed.full_state_dict(other, rank0_only=False)
    messages["full_loads"] = [k for k in full if not torch.equal(again[k], full[k])]
    torch.save(messages, os.path.join(out, f"rank{rank}.pt"))


# ------------------------------------------------------------------ test side

def _launch(mode, out):
    return gloo_procs.launch(__file__, mode, out, WORLD, TIMEOUT_S)



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _launch("train", tmp_path_factory.mktemp("fsdp_train")), train_single()


def test_each_rank_stores_half_of_the_packed_weights(trained):
    ranks, _ = trained
    for name, (local0, full) in ranks[0]["shards"].items():
        local1 = ranks[1]["shards"][name][0]
        assert local0 + local1 == full, name  # every record is stored exactly once
        assert ranks[1]["shards"][name][1] == full
        records = full // 8452
        # FSDP2 splits dim 0 as torch.chunk: ceil(U/2) records on rank 0, the rest on rank 1.
        assert local0 == -(-records // 2) * 8452, name
    sizes = ranks[0]["shards"]
    assert sizes["layers.0.up.weight"][0] * 2 == sizes["layers.0.up.weight"][1]  # even: exactly half
    assert ranks[1]["shards"]["layers.1.up.weight"][0] * 2 < sizes["layers.1.up.weight"][1]  # odd: padded
    assert ranks[1]["shards"]["inp.weight"][0] == 0  # one record: rank 1 holds none
    # In all: 7 of the 11 records on rank 0, 4 on rank 1 (per layer, ceil(U/2) on rank 0).
    assert sum(v[0] for v in ranks[0]["shards"].values()) == 7 * 8452
    assert sum(v[0] for v in ranks[1]["shards"].values()) == 4 * 8452


def test_forward_backward_match_single_process(trained):
    ranks, (_, grads, _) = trained
    for r, res in enumerate(ranks):
        assert res["grads"].keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(res["grads"][k], grads[k], rtol=1e-5, atol=1e-6, msg=f"rank {r} grad {k}")


def test_training_curve_matches_single_process(trained):
    ranks, (losses, _, sd) = trained
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["losses"], losses, rtol=1e-5, atol=1e-7, msg=f"rank {r} loss curve")
    assert losses[-1] < losses[0]
    full = ranks[0]["full"]
    for k in sd:
        if "lora_" in k:
            torch.testing.assert_close(full[k], sd[k], rtol=1e-5, atol=1e-6, msg=k)


def test_weights_are_gathered_as_uint8(trained):
    ranks, _ = trained
    for r, res in enumerate(ranks):
        gathers = res["gathers"]
        assert gathers and all(dtype == "torch.uint8" for dtype, _ in gathers), gathers
        groups = res["expected_groups"]
        # Forward gathers every group; backward gathers each decoder layer again
        # (resharded after forward), not the root (FSDP2 keeps it for backward).
        want = sorted([b for g, b in groups.items() if g != "<root>"] * 2 + [groups["<root>"]])
        assert sorted(b for _, b in gathers) == want, (gathers, groups)
        # The packed weights move at 4.13 bits per weight, ~3.9x less than bf16
        # (here per 16384-weight record: these layers are smaller than a few records).
        packed = sum(full for _, full in res["shards"].values())
        assert packed == 11 * 8452
        assert packed / (11 * 16384 * 2) < 0.26


def test_gathered_checkpoint_is_the_single_process_layout(trained):
    import lowbit

    ranks, (_, _, sd) = trained
    full = ranks[0]["full"]
    assert list(full) == list(sd)  # the same keys, in the same order
    for k in sd:
        assert full[k].dtype == sd[k].dtype and full[k].shape == sd[k].shape, k
        if "lora_" not in k:
            assert torch.equal(full[k], sd[k]), k  # frozen tensors: byte-identical
    for k, v in ranks[0]["ref_packed"].items():
        assert torch.equal(full[k], v), k
    assert ranks[1]["full"] == {}  # rank0_only
    # Loads into a single-process model and writes the same bytes back.
    single = build_model(seed=3)
    single.load_state_dict(full)
    back = single.state_dict()
    assert list(back) == list(full)
    for k in full:
        assert torch.equal(back[k], full[k]), k
    assert isinstance(single.inp, lowbit.Linear4bit)
    for r, res in enumerate(ranks):
        assert res["reloaded_equal"], f"rank {r}: load_full_state_dict + full_state_dict changed bytes"
        assert res["sharded_reload_equal"], f"rank {r}: the rank-local state dict did not round-trip"


def test_cpu_offload_trains_like_the_unoffloaded_run(trained):
    """shard_model(cpu_offload=True) applies FSDP2's CPUOffloadPolicy to every
    parameter (packed 4-bit records, LoRA, the head) and trains to the same loss
    curve and checkpoint. On a CPU mesh the host-to-device copies are no-ops and
    nothing is pinned (pinning needs a CUDA driver), so this checks FSDP2's
    offload path with Packed4bitWeight (host-side shards, the copy before each
    all-gather, gradients moved to the host, the optimizer on host shards);
    tests/gpu/fsdp_2gpu.py checks the same on two GPUs, where the copies are real."""
    ranks, (losses, _, _) = trained
    for r, res in enumerate(ranks):
        off = res["offload"]
        assert off["flags"] and all(f == (True, "cpu") for f in off["flags"].values()), off["flags"]
        assert any(name.endswith("up.weight") for name in off["flags"])  # the packed weights are offloaded too
        torch.testing.assert_close(off["losses"], res["losses"], rtol=1e-5, atol=1e-7, msg=f"rank {r}")
        torch.testing.assert_close(off["losses"], losses, rtol=1e-5, atol=1e-7, msg=f"rank {r}")
        full = ranks[0]["full"]
        assert list(off["full"]) == list(full)
        for k in full:
            torch.testing.assert_close(off["full"][k], full[k], rtol=1e-5, atol=1e-6, msg=k)


def test_8bit_optimizer_steps_on_sharded_adapters(tmp_path):
    ranks = _launch("optim8", tmp_path)
    for paged in (False, True):
        l0 = ranks[0][paged]["losses"]
        assert l0 == ranks[1][paged]["losses"]
        assert l0[-1] < l0[0]
        for r in range(WORLD):
            for local_shape, dtype, state_shape in ranks[r][paged]["states"]:
                assert dtype == torch.uint8 and state_shape == local_shape  # shard-sized 8-bit states
    assert ranks[0][False]["losses"] == ranks[0][True]["losses"]  # paging changes nothing on the CPU


def test_bad_inputs_raise_on_every_rank(tmp_path):
    ranks = _launch("bad", tmp_path)
    for r, msgs in enumerate(ranks):
        assert "no Linear4bit layers" in msgs.get("unconverted", ""), (r, msgs)
        assert "rank 1 differs from rank 0" in msgs.get("mismatch", ""), (r, msgs)
        assert "r=4" in msgs["mismatch"] and "r=8" in msgs["mismatch"]
        assert "world size 2" in msgs.get("world", "") and "world size 1" in msgs["world"], (r, msgs)
        assert msgs["full_loads"] == [], (r, msgs["full_loads"])
    assert ranks[0]["mismatch"] == ranks[1]["mismatch"]


if __name__ == "__main__":
    gloo_procs.run_worker({"train": _worker_train, "optim8": _worker_optim8, "bad": _worker_bad})
