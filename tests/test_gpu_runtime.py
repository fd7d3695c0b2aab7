"""CUDA runtime behaviour: the ops on a non-default stream give the default
stream's results, tensors on a second GPU stay there and give the first GPU's
results, and a quantized model + PagedAdamW8bit built and deleted in a loop
gives all its memory back (the caching allocator's and the managed states').
Every test skips without a CUDA device."""
import gc

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import functional as F, ops
from lowbit.optim import AdamW8bit, PagedAdamW8bit

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _on_side_stream(fn):
    """fn() run on a fresh stream that first waits for the current one; the
    result is synchronized before it is returned."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = fn()
    s.synchronize()
    return out


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, F.QuantState):
        for x, y in zip(a.quant_args(), b.quant_args()):
            _equal(x, y)


# ---------------------------------------------------------------- non-default stream


@pytest.mark.parametrize("dq", [False, True])
def test_quantize_dequantize_on_side_stream(dq):
    w = torch.randn(1024, 777, device="cuda", dtype=torch.bfloat16)
    want = F.quantize_4bit(w, 64, "nf4", dq)
    torch.cuda.synchronize()
    got = _on_side_stream(lambda: F.quantize_4bit(w, 64, "nf4", dq))
    _equal(got, want)
    packed, st = want
    want_w = F.dequantize_4bit(packed, st, torch.float16)
    torch.cuda.synchronize()
    got_w = _on_side_stream(lambda: F.dequantize_4bit(packed, st, torch.float16))
    assert torch.equal(got_w, want_w)


def test_8bit_blockwise_on_side_stream():
    a = torch.randn(100_003, device="cuda")
    want = F.quantize_blockwise(a)
    want_a = F.dequantize_blockwise(*want)
    torch.cuda.synchronize()
    got = _on_side_stream(lambda: F.quantize_blockwise(a))
    _equal(got, want)
    assert torch.equal(_on_side_stream(lambda: F.dequantize_blockwise(*got)), want_a)


@pytest.mark.parametrize("M", [1, 64, 300])
def test_matmul_4bit_forward_backward_on_side_stream(M):
    packed, st = F.quantize_4bit(torch.randn(4096, 1024, device="cuda") * 0.02)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        xi = x.clone().requires_grad_()
        y = F.matmul_4bit(xi, packed, st)
        (gx,) = torch.autograd.grad(y, xi, g)
        return y, gx

    want = fwd_bwd()
    torch.cuda.synchronize()
    # Work queued on the default stream just before must not race with the side stream.
    got = _on_side_stream(fwd_bwd)
    _equal(got, want)


def test_adamw8bit_step_on_side_stream():
    torch.manual_seed(0)
    p0 = [torch.randn(1024, 333, device="cuda"), torch.randn(100, device="cuda"), torch.randn(4096, 64, device="cuda")]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(3)]

    def run(side):
        ps = [nn.Parameter(p.clone()) for p in p0]
        opt = AdamW8bit(ps, lr=1e-3)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            if side:
                _on_side_stream(opt.step)
            else:
                opt.step()
        torch.cuda.synchronize()
        return ps, opt

    a, oa = run(False)
    b, ob = run(True)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for k in ("step", "state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(oa.state[pa][k], ob.state[pb][k]), k


def test_side_stream_does_not_sync_with_a_busy_default_stream():
    """The ops queue on the current stream: a long matmul on the default
    stream does not delay a quantize on a side stream (no device-wide sync)."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda")
    F.quantize_4bit(w)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    done = torch.cuda.Event()
    for _ in range(50):
        big @ big  # the default stream stays busy for a while
    with torch.cuda.stream(s):
        F.quantize_4bit(w)
        done.record(s)
    done.synchronize()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "the side-stream quantize waited for the default stream's matmuls"


# ---------------------------------------------------------------- a second GPU


@two_gpus
def test_ops_on_second_gpu_stay_there_and_match_the_first():
    torch.manual_seed(0)
    w = torch.randn(512, 384) * 0.05
    x = torch.randn(64, 384, dtype=torch.bfloat16)
    out = {}
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):  # the current device is 0 even for the cuda:1 tensors
            packed, st = F.quantize_4bit(w.to(dev))
            assert packed.device == torch.device(dev) and st.absmax.device == torch.device(dev)
            deq = F.dequantize_4bit(packed, st, torch.float32)
            xi = x.to(dev).requires_grad_()
            y = F.matmul_4bit(xi, packed, st)
            y.float().sum().backward()
            q8 = F.quantize_blockwise(w.to(dev).flatten())
            for t in (deq, y, xi.grad, *q8):
                assert t.device == torch.device(dev)
            out[dev] = [packed, st.absmax, deq, y, xi.grad, *q8]
    for a, b in zip(out["cuda:0"], out["cuda:1"]):
        assert torch.equal(a.cpu(), b.cpu())


@two_gpus
def test_optimizer_on_second_gpu_matches_the_first():
    torch.manual_seed(0)
    p0 = torch.randn(300, 500)
    grads = [torch.randn(300, 500) for _ in range(3)]
    res = {}
    for dev in ("cuda:0", "cuda:1"):
        p = nn.Parameter(p0.to(dev))
        opt = PagedAdamW8bit([p], lr=1e-3, page_min_size=0)
        with torch.cuda.device(0):
            for g in grads:
                p.grad = g.to(dev)
                opt.step()
        torch.cuda.synchronize(dev)
        assert opt.state[p]["state1"].device == torch.device(dev)
        res[dev] = [p.detach()] + [opt.state[p][k] for k in ("state1", "state2", "absmax1", "absmax2")]
    for a, b in zip(res["cuda:0"], res["cuda:1"]):
        assert torch.equal(a.cpu(), b.cpu())


@two_gpus
def test_linear4bit_moved_to_second_gpu():
    lin = lowbit.Linear4bit.from_linear(nn.Linear(256, 128), r=8, device="cuda:0")
    x = torch.randn(4, 256, device="cuda:0", dtype=torch.bfloat16)
    want = lin(x)
    lin1 = lin.to("cuda:1")
    assert lin1.quant_state.device == torch.device("cuda:1")
    got = lin1(x.to("cuda:1"))
    assert got.device == torch.device("cuda:1") and torch.equal(got.cpu(), want.cpu())


# ---------------------------------------------------------------- memory comes back


def _build_and_step(layers=4, features=1024):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(features, features, dtype=torch.bfloat16) for _ in range(layers)]).cuda()
    lowbit.quantize_model(model, lora_r=16, skip_modules=(), device="cuda", progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    # page_min_size=0 and min_8bit_size=0: every LoRA state (16 x 1024 elements) is 8-bit and managed
    opt = PagedAdamW8bit(params, lr=1e-3, min_8bit_size=0, page_min_size=0)
    x = torch.randn(8, features, device="cuda", dtype=torch.bfloat16)
    model(x).float().square().mean().backward()
    opt.step()
    managed = [t for s in opt.state.values() for t in (s["state1"], s["state2"]) if ops.is_managed(t)]
    managed_bytes = sum(t.numel() * t.element_size() for t in managed)
    return model, opt, managed_bytes, len(managed)


def _settle():
    gc.collect()
    torch.cuda.synchronize()


def test_model_and_paged_optimizer_release_all_memory():
    # The LoRA states are a few hundred KiB of managed memory, below what the
    # free-memory check can resolve, so each round also pages the states of
    # one large parameter (2 x 8 MiB) to make a leak of managed memory visible.
    big = nn.Parameter(torch.randn(4096, 2048, device="cuda"))

    def one_round():
        model, opt, managed_bytes, n_managed = _build_and_step()
        assert n_managed == 2 * 2 * 4 and managed_bytes > 0  # m and v of A and B in each of 4 layers
        big_opt = PagedAdamW8bit([big], lr=1e-3)
        big.grad = torch.randn_like(big)
        big_opt.step()
        assert ops.is_managed(big_opt.state[big]["state1"]) and ops.is_managed(big_opt.state[big]["state2"])
        _settle()
        return model, opt, big_opt

    # A first round warms up what stays for the process (CUDA context pieces,
    # cuBLAS workspaces, the code-book caches): the baseline is taken after it.
    held = one_round()
    del held
    big.grad = None
    _settle()
    torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated()
    base_free = torch.cuda.mem_get_info()[0]
    base_managed = ops.managed_bytes()
    for round_ in range(5):
        held = one_round()
        assert ops.managed_bytes() - base_managed >= 2 * big.numel(), f"round {round_}: paged states not managed"
        # (Whether the driver counts resident managed pages in its free-memory
        # figure is not something this test relies on: residency is the
        # driver's business; release is ours.)
        del held
        big.grad = None
        _settle()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_allocated() == base_alloc, f"round {round_}: memory_allocated did not come back"
        assert ops.managed_bytes() == base_managed, f"round {round_}: managed memory not freed"
        # The driver's free figure also moves with things outside lowbit (lazily
        # loaded kernel modules, library workspaces): a loose bound, which a
        # leak of one round's 16 MiB of paged states per round would still break
        # by the last round.
        free = torch.cuda.mem_get_info()[0]
        assert base_free - free <= (32 << 20), \
            f"round {round_}: {(base_free - free) / 2**20:.1f} MiB of device memory not given back"
