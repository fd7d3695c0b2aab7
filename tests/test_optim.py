"""AdamW8bit / PagedAdamW8bit and the lowbit.adamw8bit_step op.

The reference below is the quantized AdamW step written in plain PyTorch
float32 from the documented math (csrc/core/adamw8bit.h header comment), not
from the C++: dequantize m/v per 256-block, the update in SPEC section 8 form
(decay first, as torch), a non-finite gradient element keeps everything, new absmax per
block, nearest map entry (ties to the lower one). It derives the per-step
scalars the documented way (b^t by repeated squaring in float64), so the op must
agree with it exactly, parameters and codes alike.
"""
import copy
import gc
import io
import math

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.functional import get_dynamic_map
from lowbit.optim import AdamW8bit, PagedAdamW8bit, state_bytes

from conftest import HAS_CUDA, devices

BS = 256
SIGNED = get_dynamic_map(True, "cpu")
UNSIGNED = get_dynamic_map(False, "cpu")
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# ---------------------------------------------------------------- reference


def f32(x):
    return torch.tensor(x, dtype=torch.float32)


def pow_int(b, t):
    r = 1.0
    while t > 0:
        if t & 1:
            r *= b
        b *= b
        t >>= 1
    return r


def ref_scalars(lr, step, b1, b2, eps, wd):
    t = max(int(step), 1)
    lr = float(f32(lr))
    return dict(
        b1=f32(b1), b2=f32(b2), omb1=f32(1.0 - b1), omb2=f32(1.0 - b2),
        eps_hat=f32(eps * math.sqrt(1.0 - pow_int(b2, t))),
        decay=f32(1.0 - lr * wd),
        step_size=f32(lr * math.sqrt(1.0 - pow_int(b2, t)) / (1.0 - pow_int(b1, t))),
    )


# torch's CPU sqrt is not always correctly rounded, and it divides by a 0-dim
# tensor through a reciprocal: take both in float64 and round once, which is
# the exactly rounded float32 result.
def sqrt(x):
    return torch.sqrt(x.double()).float()


def div(a, b):
    return (a.double() / b.double()).float()


def ref_encode(code, x):
    """Nearest entry, ties to the lower one: the number of midpoints below x."""
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(mids, x.contiguous(), right=False).to(torch.uint8)


def ref_block_absmax(x, n):
    nb = -(-n // BS)
    padded = torch.zeros(nb * BS)
    padded[:n] = x
    return padded.abs().view(nb, BS).amax(dim=1)


def ref_step(p, g, st, lr, betas, eps, wd):
    """One step on copies; st holds step (count before this step), state1/2, absmax1/2."""
    n = p.numel()
    step = float(st["step"]) + 1
    s = ref_scalars(lr, step, betas[0], betas[1], eps, wd)
    pf = p.detach().cpu().float().flatten()
    gf = g.detach().cpu().float().flatten()
    eight = st["state1"].dtype == torch.uint8
    blk = torch.arange(n) // BS
    if eight:
        m = SIGNED[st["state1"].cpu().flatten().long()] * st["absmax1"].cpu()[blk]
        v = UNSIGNED[st["state2"].cpu().flatten().long()] * st["absmax2"].cpu()[blk]
    else:
        m = st["state1"].cpu().flatten().clone()
        v = st["state2"].cpu().flatten().clone()
    ok = torch.isfinite(gf)
    m_new = s["b1"] * m + s["omb1"] * gf
    v_new = s["b2"] * v + s["omb2"] * (gf * gf)
    denom = sqrt(v_new) + s["eps_hat"]
    p_new = pf * s["decay"]
    p_new = p_new - s["step_size"] * div(m_new, denom)
    m = torch.where(ok, m_new, m)
    v = torch.where(ok, v_new, v)
    pf = torch.where(ok, p_new, pf)
    out = {"step": torch.tensor(step)}
    if eight:
        am1, am2 = ref_block_absmax(m, n), ref_block_absmax(v, n)
        inv1 = torch.where(am1 > 0, 1.0 / am1, torch.zeros_like(am1))
        inv2 = torch.where(am2 > 0, 1.0 / am2, torch.zeros_like(am2))
        out["state1"] = ref_encode(SIGNED, m * inv1[blk]).view(p.shape)
        out["state2"] = ref_encode(UNSIGNED, v * inv2[blk]).view(p.shape)
        out["absmax1"], out["absmax2"] = am1, am2
    else:
        out["state1"], out["state2"] = m.view(p.shape), v.view(p.shape)
        out["absmax1"], out["absmax2"] = torch.zeros(0), torch.zeros(0)
    return pf.view(p.shape).to(p.dtype), out


# ---------------------------------------------------------------- helpers


def random_state(n, shape, eight_bit, device, step=None):
    """Random (not zero) states, so dequantization is exercised from step 1."""
    st = {"step": torch.tensor(float(step if step is not None else torch.randint(0, 50, ()).item()))}
    if eight_bit:
        nb = -(-n // BS)
        st["state1"] = torch.randint(0, 256, shape, dtype=torch.uint8)
        st["state2"] = torch.randint(0, 256, shape, dtype=torch.uint8)
        st["absmax1"] = torch.rand(nb) * 0.1
        st["absmax2"] = torch.rand(nb) * 0.01
    else:
        st["state1"] = torch.randn(shape) * 0.05
        st["state2"] = torch.rand(shape) * 0.005
        st["absmax1"], st["absmax2"] = torch.zeros(0), torch.zeros(0)
    return {k: v.to(device) for k, v in st.items()}


def call_op(ps, gs, sts, lr, betas, eps, wd, device):
    steps = [st["step"].to(device).float() + 1 for st in sts]  # the op takes the count including this step
    for st, s in zip(sts, steps):
        st["step"] = s
    ops.adamw8bit_step(ps, gs, [s["state1"] for s in sts], [s["state2"] for s in sts],
                       [s["absmax1"] for s in sts], [s["absmax2"] for s in sts], steps,
                       torch.tensor(lr, dtype=torch.float32), get_dynamic_map(True, device),
                       get_dynamic_map(False, device), betas[0], betas[1], eps, wd)


def assert_state_equal(got, want, what=""):
    for k in ("state1", "state2", "absmax1", "absmax2"):
        a, b = got[k].cpu(), want[k].cpu()
        if a.dtype == torch.uint8:
            diff = (a != b).sum().item()
            assert diff == 0, f"{what} {k}: {diff} of {a.numel()} codes differ from the reference"
        else:
            assert torch.equal(a, b), f"{what} {k}: max abs diff {(a - b).abs().max().item()}"


def assert_bitwise(a, b, what=""):
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                       b.view(torch.uint8) if b.dtype != torch.uint8 else b), \
        f"{what}: not bit-identical, max abs diff {(a.float() - b.float()).abs().max().item()}"


SHAPES = [(64, 96), (5000,), (33, 300), (70001,), (300, 10)]  # 8-bit (>= 4096) and float32 states


# ---------------------------------------------------------------- op vs reference


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_step_matches_reference(device, dtype):
    lr, betas, eps, wd = 3e-3, (0.9, 0.995), 1e-6, 0.05
    ps, gs, sts, want = [], [], [], []
    for shape in SHAPES:
        n = math.prod(shape)
        p = torch.randn(shape).to(dtype)
        g = (torch.randn(shape) * 0.1).to(dtype)
        st = random_state(n, shape, n >= 4096, "cpu")
        want.append(ref_step(p, g, st, lr, betas, eps, wd))
        ps.append(p.to(device))
        gs.append(g.to(device))
        sts.append({k: v.to(device) for k, v in st.items()})
    call_op(ps, gs, sts, lr, betas, eps, wd, device)
    for shape, p, st, (wp, wst) in zip(SHAPES, ps, sts, want):
        assert_bitwise(p, wp, f"param {shape}")
        assert_state_equal(st, wst, f"shape {shape}")
        assert st["step"].item() == wst["step"].item()


@pytest.mark.parametrize("device", devices())
def test_optimizer_multiple_steps_match_reference(device):
    lr, betas, eps, wd = 2e-3, (0.85, 0.99), 1e-8, 0.1
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(128, 100), (257,), (40, 130)]]
    ref_p = [p.detach().cpu().clone() for p in params]
    ref_st = [None] * len(params)
    opt = AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for it in range(6):
        grads = [torch.randn(p.shape) * (0.01 + it) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            if ref_st[i] is None:  # first step: the optimizer's initial (zero) state
                ref_st[i] = {k: v.cpu().clone() for k, v in opt.state[p].items()}
                ref_st[i]["step"] = torch.tensor(0.0)
                if ref_st[i]["state1"].dtype == torch.uint8:
                    ref_st[i]["state1"].fill_(127)
                    ref_st[i]["state2"].fill_(0)
                    ref_st[i]["absmax1"].zero_()
                    ref_st[i]["absmax2"].zero_()
                else:
                    ref_st[i]["state1"].zero_()
                    ref_st[i]["state2"].zero_()
            ref_p[i], ref_st[i] = ref_step(ref_p[i], g, ref_st[i], lr, betas, eps, wd)
            assert_bitwise(p, ref_p[i], f"step {it} param {i}")
            assert_state_equal(opt.state[p], ref_st[i], f"step {it} param {i}")


def test_initial_state_layout():
    big, small = torch.nn.Parameter(torch.randn(100, 50)), torch.nn.Parameter(torch.randn(10, 10))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    sb, ss = opt.state[big], opt.state[small]
    assert sb["state1"].dtype == torch.uint8 and sb["state1"].shape == big.shape
    assert sb["absmax1"].shape == (-(-5000 // 256),) and sb["absmax1"].dtype == torch.float32
    assert ss["state1"].dtype == torch.float32 and ss["absmax1"].numel() == 0
    assert sb["step"].item() == 1.0 and sb["step"].dtype == torch.float32
    # 8-bit state: 2 bytes per element plus 8 bytes per 256 (two float32 absmax) plus the step
    assert state_bytes(AdamW8bit([big])) == 0
    assert (sb["state1"].numel() * 2 + sb["absmax1"].numel() * 8) / big.numel() <= 2.04


@pytest.mark.parametrize("device", devices())
def test_small_params_match_torch_adamw(device):
    """Float32 states (below min_8bit_size) are plain AdamW: compare with torch's."""
    torch.manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(40, 50, device=device))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = AdamW8bit([p1], lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn_like(p1)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o1.state[p1]["state1"].dtype == torch.float32
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.state[p1]["state1"], o2.state[p2]["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(o1.state[p1]["state2"], o2.state[p2]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("eight_bit", [True, False])
def test_non_finite_gradient_keeps_element(device, eight_bit):
    """Rule: a NaN/inf gradient element leaves its parameter, m and v as they were."""
    shape = (50, 100) if eight_bit else (30, 30)
    n = math.prod(shape)
    p = torch.randn(shape)
    g = torch.randn(shape) * 0.1
    bad = torch.rand(shape) < 0.05
    bad.view(-1)[:3] = True
    g[bad] = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(n)[: int(bad.sum())]
    st = random_state(n, shape, eight_bit, "cpu", step=3)
    wp, wst = ref_step(p, g, st, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    pd, gd, std = p.clone().to(device), g.to(device), {k: v.clone().to(device) for k, v in st.items()}
    old = {k: v.clone() for k, v in std.items()}
    call_op([pd], [gd], [std], 1e-2, (0.9, 0.999), 1e-8, 0.1, device)
    assert_bitwise(pd, wp, "param")
    assert_state_equal(std, wst)
    assert torch.equal(pd.cpu()[bad], p[bad]), "a parameter with a non-finite gradient changed"
    assert not torch.equal(pd.cpu()[~bad], p[~bad])
    for k in ("absmax1", "absmax2"):
        assert torch.isfinite(std[k]).all()
    if eight_bit:  # kept values, re-encoded with the block's new absmax
        blk = torch.arange(n).view(shape)[bad] // BS
        m_old = SIGNED[old["state1"].cpu()[bad].long()] * old["absmax1"].cpu()[blk]
        m_new = SIGNED[std["state1"].cpu()[bad].long()] * std["absmax1"].cpu()[blk]
        step = std["absmax1"].cpu()[blk] * 0.02  # coarser than any map step within |x| <= absmax
        assert ((m_new - m_old).abs() <= step + 1e-12).all()
    else:
        assert torch.equal(std["state1"].cpu()[bad], old["state1"].cpu()[bad])
        assert torch.equal(std["state2"].cpu()[bad], old["state2"].cpu()[bad])


def test_all_non_finite_gradient_changes_no_parameter():
    p = torch.nn.Parameter(torch.randn(80, 80))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.isfinite(opt.state[p]["absmax1"]).all() and torch.isfinite(opt.state[p]["absmax2"]).all()


@pytest.mark.parametrize("device", devices())
def test_param_groups_have_their_own_hyperparameters(device):
    cfgs = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
            dict(lr=5e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.3)]
    params = [torch.nn.Parameter(torch.randn(70, 90, device=device)) for _ in cfgs]
    opt = AdamW8bit([dict(params=[p], **c) for p, c in zip(params, cfgs)])
    for p in params:
        p.grad = torch.randn_like(p)
    init = [{"step": torch.tensor(0.0), "state1": torch.full(p.shape, 127, dtype=torch.uint8),
             "state2": torch.zeros(p.shape, dtype=torch.uint8), "absmax1": torch.zeros(25),
             "absmax2": torch.zeros(25)} for p in params]
    want = [ref_step(p, p.grad, st, c["lr"], c["betas"], c["eps"], c["weight_decay"])
            for p, st, c in zip(params, init, cfgs)]
    opt.step()
    for p, (wp, wst) in zip(params, want):
        assert_bitwise(p, wp)
        assert_state_equal(opt.state[p], wst)


def test_lr_is_read_every_step_and_schedulers_work():
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e == 0 else 0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()  # lr 0, no decay: the parameter must not move
    assert torch.equal(p.detach(), before)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(100, 50)), torch.nn.Parameter(torch.randn(100, 50))
    opt = AdamW8bit([a, b])
    a.grad = torch.randn_like(a)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before) and len(opt.state[b]) == 0
    opt.zero_grad()
    assert a.grad is None


@pytest.mark.parametrize("device", devices())
def test_unaligned_and_many_tensors(device):
    """More tensors than one multi-tensor launch holds, mixed dtypes and sizes,
    and parameters that start at an odd offset (no vector loads)."""
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    ps, gs, sts, want = [], [], [], []
    for i in range(110):
        dtype = FLOAT_DTYPES[i % 3]
        n = [4096, 4097, 5000, 300, 12345][i % 5]
        base = torch.randn(n + 1).to(dtype)
        p = base[1:] if i % 4 == 0 else base[:n]  # odd element offset: unaligned
        g = torch.randn(n).to(dtype)
        st = random_state(n, (n,), n >= 4096, "cpu")
        want.append(ref_step(p, g, st, lr, betas, eps, wd))
        pd = p.clone().to(device) if i % 4 else torch.randn(n + 1).to(dtype).to(device)[1:].copy_(p.to(device))
        ps.append(pd)
        gs.append(g.to(device))
        sts.append({k: v.to(device) for k, v in st.items()})
    call_op(ps, gs, sts, lr, betas, eps, wd, device)
    for i, (p, st, (wp, wst)) in enumerate(zip(ps, sts, want)):
        assert_bitwise(p, wp, f"param {i}")
        assert_state_equal(st, wst, f"param {i}")


# ---------------------------------------------------------------- training


def _train(opt_factory, steps=300, seed=0, noise=0.3):
    """Online regression of a fixed random teacher network: every step draws a
    fresh batch (same stream for both optimizers), so nothing can be memorized
    and the held-out loss measures the fit (its floor is noise**2 = 0.09)."""
    g = torch.Generator().manual_seed(seed)
    d = 32
    w1 = torch.randn(d, 16, generator=g) / d**0.5
    w2 = torch.randn(16, 1, generator=g) / 4

    def teacher(x):
        return torch.tanh(x @ w1) @ w2

    x_eval = torch.randn(8192, d, generator=g)
    y_eval = teacher(x_eval) + noise * torch.randn(8192, 1, generator=g)
    torch.manual_seed(seed)
    # 4096- and 8192-element weights take the 8-bit path; the rest float32 states.
    model = torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 1))
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        x = torch.randn(512, d, generator=g)
        y = teacher(x) + noise * torch.randn(512, 1, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x_eval), y_eval).item()


def test_training_matches_torch_adamw():
    ref = _train(lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=1e-2))
    got = _train(lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=1e-2))
    print(f"\nMLP regression, 300 steps: torch AdamW loss {ref:.6f}, lowbit AdamW8bit {got:.6f} "
          f"({100 * (got - ref) / ref:+.3f}%)")
    assert abs(got - ref) <= 0.01 * ref


def test_bitsandbytes_adamw8bit_close():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    p0 = torch.randn(256, 128)
    grads = [torch.randn_like(p0) * 0.1 for _ in range(5)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa = AdamW8bit([a], lr=1e-3, weight_decay=0.0)
    try:
        ob = bnb.optim.AdamW8bit([b], lr=1e-3, weight_decay=0.0)
        for g in grads:
            b.grad = g.clone()
            ob.step()
    except Exception as e:  # bnb's optimizer may not run on this backend
        pytest.skip(f"bitsandbytes AdamW8bit does not run here: {type(e).__name__}: {e}")
    for g in grads:
        a.grad = g.clone()
        oa.step()
    da, db = (a - p0).detach(), (b - p0).detach()
    rel = ((da - db).norm() / db.norm()).item()
    codes = (oa.state[a]["state1"] != ob.state[b]["state1"]).float().mean().item()
    print(f"\nvs bitsandbytes AdamW8bit (wd=0, 5 steps): |update diff| / |update| = {rel:.2e}, max element diff "
          f"{(da - db).abs().max().item():.2e} of max update {db.abs().max().item():.2e}; {100 * codes:.2f}% of m "
          f"codes differ (bnb's CPU quantizer is not exactly nearest-entry)")
    assert rel <= 0.02
    # with decay, the order differs (bnb decays after the update): still close
    ref = _train(lambda ps: bnb.optim.AdamW8bit(ps, lr=3e-3, weight_decay=1e-2), steps=100)
    got = _train(lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=1e-2), steps=100)
    print(f"MLP regression, 100 steps: bnb AdamW8bit loss {ref:.6f}, lowbit {got:.6f} ({100 * (got - ref) / ref:+.3f}%)")
    assert abs(got - ref) <= 0.05 * ref


# ---------------------------------------------------------------- save / load


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8)).to(device)


def _run(model, opt, steps, seed, sched=None):
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g).to(dev)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("device", devices())
def test_save_load_continues_bit_identically(device):
    model = _model(device)
    opt = AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _run(model, opt, 5, seed=1, sched=sched)
    saved = _save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    _run(model, opt, 4, seed=2, sched=sched)

    ck = torch.load(saved, weights_only=True)
    model2 = _model(device, seed=123)
    model2.load_state_dict(ck["model"])
    opt2 = AdamW8bit(model2.parameters(), lr=1.0, weight_decay=0.0)  # hyperparameters come from the state_dict
    opt2.load_state_dict(ck["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    sched2.load_state_dict(ck["sched"])
    _run(model2, opt2, 4, seed=2, sched=sched2)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert_bitwise(a, b, name)
        for k in ("step", "state1", "state2", "absmax1", "absmax2"):
            assert_bitwise(opt.state[a][k], opt2.state[b][k], f"{name} {k}")


def _run_fixed_grads(model, opt, steps, seed):
    """Steps with gradients drawn on the CPU: the same on every device, so a
    continuation elsewhere can be compared bit for bit (backprop through the
    model would not be: CPU and CUDA matmuls round differently)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        opt.step()


def _portability(src_dev, src_cls, dst_dev, dst_cls):
    model = _model(src_dev)
    opt = src_cls(model.parameters(), lr=2e-3, **({"page_min_size": 0} if src_cls is PagedAdamW8bit else {}))
    _run_fixed_grads(model, opt, 3, seed=1)
    ck = _save({"model": model.state_dict(), "opt": opt.state_dict()})
    _run_fixed_grads(model, opt, 3, seed=2)
    ck = torch.load(ck, weights_only=True, map_location=dst_dev)
    model2 = _model(dst_dev, seed=7)
    model2.load_state_dict(ck["model"])
    opt2 = dst_cls(model2.parameters(), **({"page_min_size": 0} if dst_cls is PagedAdamW8bit else {}))
    opt2.load_state_dict(ck["opt"])
    _run_fixed_grads(model2, opt2, 3, seed=2)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert_bitwise(a, b, f"{src_dev}/{src_cls.__name__} -> {dst_dev}/{dst_cls.__name__} {name}")
        for k in ("state1", "state2", "absmax1", "absmax2", "step"):
            assert_bitwise(opt.state[a][k], opt2.state[b][k], f"{name} {k}")
    return opt2, model2


@gpu
@pytest.mark.parametrize("src,dst", [("cpu", "cuda"), ("cuda", "cpu")])
def test_state_dict_portable_between_cpu_and_cuda(src, dst):
    _portability(src, AdamW8bit, dst, AdamW8bit)


@gpu
def test_state_dict_portable_between_paged_and_unpaged():
    opt2, model2 = _portability("cuda", PagedAdamW8bit, "cuda", AdamW8bit)
    assert not any(ops.is_managed(s["state1"]) for s in opt2.state.values())
    opt2, model2 = _portability("cuda", AdamW8bit, "cuda", PagedAdamW8bit)
    big = model2[0].weight
    assert ops.is_managed(opt2.state[big]["state1"]) and ops.is_managed(opt2.state[big]["state2"])
    _portability("cpu", AdamW8bit, "cuda", PagedAdamW8bit)


def test_load_state_dict_rejects_other_layouts():
    model = _model("cpu")
    opt = AdamW8bit(model.parameters())
    _run(model, opt, 1, seed=0)
    sd = opt.state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 9))
    with pytest.raises(ValueError, match="different param layout"):
        AdamW8bit(other.parameters()).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter groups"):
        AdamW8bit([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]) \
            .load_state_dict(sd)
    with pytest.raises(ValueError, match="has 4 parameters, this optimizer's has 3"):
        AdamW8bit(list(model.parameters())[:3]).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    del bad["state"][0]["absmax1"]
    with pytest.raises(ValueError, match="lacks"):
        AdamW8bit(model.parameters()).load_state_dict(bad)


def test_load_keeps_float32_states_of_bf16_params():
    """torch's default load would cast float32 absmax to the parameter dtype."""
    p = torch.nn.Parameter(torch.randn(100, 100).bfloat16())
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = AdamW8bit([torch.nn.Parameter(p.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    st = next(iter(opt2.state.values()))
    assert st["absmax1"].dtype == torch.float32
    assert_bitwise(st["absmax1"], opt.state[p]["absmax1"])


# ---------------------------------------------------------------- bad input


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.1"):
        AdamW8bit(p, lr=-0.1)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\), got 1.0"):
        AdamW8bit(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got -0.5"):
        AdamW8bit(p, betas=(0.9, -0.5))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        AdamW8bit(p, eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        AdamW8bit(p, weight_decay=-1.0)
    with pytest.raises(ValueError, match="param group 1: lr must be >= 0"):
        AdamW8bit([{"params": p}, {"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0}])
    opt = AdamW8bit(p)
    opt.param_groups[0]["lr"] = -1e-3
    p[0].grad = torch.randn(4)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()


def test_complex_and_integer_params_rejected():
    with pytest.raises(TypeError, match="complex"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        AdamW8bit([torch.zeros(4, dtype=torch.float64, requires_grad=True)])


def test_sparse_gradient_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def _op_args(n=5000):
    p, g = torch.randn(n), torch.randn(n)
    nb = -(-n // 256)
    return dict(params=[p], grads=[g], state1=[torch.zeros(n, dtype=torch.uint8)],
                state2=[torch.zeros(n, dtype=torch.uint8)], absmax1=[torch.zeros(nb)], absmax2=[torch.zeros(nb)],
                steps=[torch.ones(())], lr=torch.tensor(1e-3), code1=SIGNED, code2=UNSIGNED, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("change,match", [
    (dict(grads=[]), "'grads' has 0 tensors but 'params' has 1"),
    (dict(grads=[torch.randn(5000).double()]), r"grads\[0\]' must have dtype Float"),
    (dict(grads=[torch.randn(50, 100)]), r"grads\[0\]' has shape \[50, 100\]"),
    (dict(absmax1=[torch.zeros(3)]), r"absmax1\[0\]' must have 20 elements"),
    (dict(state2=[torch.zeros(5000)]), r"state2\[0\]' must have dtype Byte"),
    (dict(state1=[torch.zeros(5000, dtype=torch.int32)]), "must be uint8 .* or float32"),
    (dict(params=[torch.randn(100, 100).t()[:50].reshape(-1)[:5000]]), None),  # contiguous: fine
    (dict(params=[torch.randn(10000)[::2]]), "must be contiguous"),
    (dict(beta1=1.0), "'beta1' must be in \\[0, 1\\), got 1"),
    (dict(eps=-1.0), "'eps' must be >= 0"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "'lr' must have 1 elements"),
    (dict(code1=torch.zeros(255)), "'code1' must have 256 elements"),
    (dict(steps=[torch.ones((), dtype=torch.int64)]), r"steps\[0\]' must have dtype Float"),
])
def test_op_rejects_bad_arguments(change, match):
    args = _op_args()
    args.update(change)
    if match is None:
        ops.adamw8bit_step(**args)
        return
    with pytest.raises(ValueError, match=match):
        ops.adamw8bit_step(**args)


def test_op_rejects_other_blocksize():
    with pytest.raises(ValueError, match="'blocksize' must be 256"):
        ops.adamw8bit_step(**_op_args(), blocksize=128)


def test_sparse_grad_rejected_by_op():
    # The op has no sparse kernel: the dispatcher refuses it (the optimizer
    # raises its own message before that, see test_sparse_gradient_rejected).
    args = _op_args()
    args["grads"] = [torch.randn(5000).to_sparse()]
    with pytest.raises(NotImplementedError, match="Sparse"):
        ops.adamw8bit_step(**args)


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    args = _op_args(5000)
    small = torch.randn(300, device=device)
    for k in ("params", "grads", "state1", "state2", "absmax1", "absmax2", "steps"):
        args[k] = [t.to(device) for t in args[k]]
    args["params"].append(small)
    args["grads"].append(torch.randn(300, device=device))
    args["state1"].append(torch.zeros(300, device=device))
    args["state2"].append(torch.rand(300, device=device))
    args["absmax1"].append(torch.zeros(0, device=device))
    args["absmax2"].append(torch.zeros(0, device=device))
    args["steps"].append(torch.full((), 4.0, device=device))
    args["code1"], args["code2"] = SIGNED.to(device), UNSIGNED.to(device)
    names = ["params", "grads", "state1", "state2", "absmax1", "absmax2", "steps", "lr", "code1", "code2", "beta1",
             "beta2", "eps", "weight_decay"]
    torch.library.opcheck(torch.ops.lowbit.adamw8bit_step.default, tuple(args[k] for k in names))
    # counting the steps itself (the optimizer's call) and numbering messages from index_base
    torch.library.opcheck(torch.ops.lowbit.adamw8bit_step.default, tuple(args[k] for k in names) + (256, True, 7))


def test_opcheck_is_managed_cpu():
    torch.library.opcheck(torch.ops.lowbit.is_managed.default, (torch.randn(3),))
    assert ops.is_managed(torch.randn(3)) is False


# ---------------------------------------------------------------- CUDA: device vs CPU, paging, graphs


@gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_equals_cpu_bitwise(dtype):
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    shapes = [(4096, 64), (1000, 33), (16, 4096), (11008, 16), (777,)]
    cpu = [(torch.randn(s).to(dtype), (torch.randn(s) * 0.01).to(dtype)) for s in shapes]
    sts = [random_state(math.prod(s), s, math.prod(s) >= 4096, "cpu") for s in shapes]
    pc = [p.clone() for p, _ in cpu]
    stc = [{k: v.clone() for k, v in st.items()} for st in sts]
    call_op(pc, [g for _, g in cpu], stc, lr, betas, eps, wd, "cpu")
    pg = [p.cuda() for p, _ in cpu]
    stg = [{k: v.cuda() for k, v in st.items()} for st in sts]
    call_op(pg, [g.cuda() for _, g in cpu], stg, lr, betas, eps, wd, "cuda")
    for s, a, b, sa, sb in zip(shapes, pc, pg, stc, stg):
        assert_bitwise(a, b, f"param {s}")
        for k in ("state1", "state2", "absmax1", "absmax2"):
            assert_bitwise(sa[k], sb[k], f"{s} {k}")


@gpu
def test_cuda_lr_tensor_and_graph_capture():
    """lr as a CUDA tensor gives the float-lr result, and the step is capturable."""
    torch.manual_seed(0)
    p0 = torch.randn(512, 300, device="cuda")
    grads = [torch.randn_like(p0) for _ in range(4)]
    a = torch.nn.Parameter(p0.clone())
    oa = AdamW8bit([a], lr=1e-3)
    for g in grads:
        a.grad = g.clone()
        oa.step()

    b = torch.nn.Parameter(p0.clone())
    lr = torch.tensor(1e-3, device="cuda")
    ob = AdamW8bit([b], lr=lr)
    b.grad = grads[0].clone()
    ob.step()  # eager: creates the state and caches the maps on the device
    static_grad = b.grad
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            ob.step()
    torch.cuda.current_stream().wait_stream(stream)
    for g in grads[1:]:
        static_grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(a, b, "graph-replayed step")
    for k in ("step", "state1", "state2", "absmax1", "absmax2"):
        assert_bitwise(oa.state[a][k], ob.state[b][k], k)


@gpu
def test_paged_states_are_managed_uncounted_and_freed():
    n_big = 4096 * 1024
    big = torch.nn.Parameter(torch.randn(4096, 1024, device="cuda"))
    mid = torch.nn.Parameter(torch.randn(200, 256, device="cuda"))  # 51200 < page_min_size: not paged
    small = torch.nn.Parameter(torch.randn(100, device="cuda"))
    ref = [torch.nn.Parameter(t.detach().clone()) for t in (big, mid, small)]
    opt = PagedAdamW8bit([big, mid, small], lr=1e-3)
    ropt = AdamW8bit(ref, lr=1e-3)
    for it in range(3):
        for p, r in zip((big, mid, small), ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.clone()
        torch.cuda.synchronize()
        a0 = torch.cuda.memory_allocated()
        opt.step()
        a1 = torch.cuda.memory_allocated()
        ropt.step()
        a2 = torch.cuda.memory_allocated()
        if it == 0:  # the states are created by the first step
            paged_counted, unpaged_counted = a1 - a0, a2 - a1
    torch.cuda.synchronize()
    sb = opt.state[big]
    assert ops.is_managed(sb["state1"]) and ops.is_managed(sb["state2"])
    assert not ops.is_managed(sb["absmax1"]) and not ops.is_managed(opt.state[mid]["state1"])
    assert not ops.is_managed(opt.state[small]["state1"]) and not ops.is_managed(big)
    for p, r in zip((big, mid, small), ref):
        assert_bitwise(p, r)
        for k in ("state1", "state2", "absmax1", "absmax2"):
            assert_bitwise(opt.state[p][k], ropt.state[r][k], k)
    # memory_allocated counts the unpaged optimizer's 8-bit states of `big`, not the paged ones
    assert unpaged_counted - paged_counted >= 2 * n_big, (paged_counted, unpaged_counted)
    assert paged_counted < n_big // 2, f"memory_allocated grew by {paged_counted} bytes with paged states"
    # the managed states are freed with the optimizer
    del ropt, ref, sb
    gc.collect()
    torch.cuda.synchronize()
    free_with = torch.cuda.mem_get_info()[0]
    managed_with = ops.managed_bytes()
    assert managed_with >= 2 * n_big
    del opt
    gc.collect()
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info()[0]
    assert managed_with - ops.managed_bytes() == 2 * n_big
    assert free_after - free_with >= 2 * n_big - (2 << 20), \
        f"only {free_after - free_with} bytes came back after deleting the optimizer (expected ~{2 * n_big})"


@gpu
def test_alloc_managed_refuses_more_than_free():
    free, total = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="bytes are free"):
        ops.alloc_managed(free + (1 << 30), "cuda")
    t = ops.alloc_managed(1 << 20, "cuda")
    assert t.dtype == torch.uint8 and t.numel() == 1 << 20 and t.is_cuda and ops.is_managed(t)
    ops.prefetch_managed([t])
    t.fill_(3)
    assert t.sum().item() == 3 << 20


def test_managed_bytes_counts_live_allocations():
    assert isinstance(ops.managed_bytes(), int) and ops.managed_bytes() >= 0
    if not HAS_CUDA:
        return
    before = ops.managed_bytes()
    t = ops.alloc_managed(3 << 20, "cuda")
    assert ops.managed_bytes() == before + (3 << 20)
    del t
    gc.collect()
    assert ops.managed_bytes() == before


def test_alloc_managed_cpu_device_rejected():
    with pytest.raises((ValueError, RuntimeError)):
        ops.alloc_managed(16, "cpu")


@pytest.mark.parametrize("device", devices())
def test_kept_step_lists_follow_grads_and_reloaded_states(device):
    """The per-group argument lists kept between steps: a parameter losing its
    gradient, a state_dict loaded in between and a new group give the same
    result as an optimizer that rebuilds everything each step."""
    torch.manual_seed(3)
    shapes = [(64, 80), (300,), (16, 16), (4096 + 7,)]

    def make():
        ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        return ps, AdamW8bit(ps, lr=1e-2, min_8bit_size=256)

    a, opt_a = make()
    b, opt_b = make()
    for q, r in zip(a, b):
        r.data.copy_(q.data)
    grads = [[torch.randn(s, device=device) for s in shapes] for _ in range(6)]
    for step, gs in enumerate(grads):
        for ps in (a, b):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if (step == 3 and i == 1) else g.clone()
        opt_a.step()
        opt_b._step_cache.clear()  # b never reuses its lists
        opt_b.step()
        if step == 4:  # a state_dict round trip replaces every state tensor of a
            opt_a.load_state_dict(copy.deepcopy(opt_a.state_dict()))
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"step {step} param {i}"
            assert_state_equal(opt_a.state[p], opt_b.state[q], f"step {step} param {i}")
    extra_a = torch.nn.Parameter(torch.randn(512, device=device))
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    opt_a.add_param_group({"params": [extra_a]})
    opt_b.add_param_group({"params": [extra_b]})
    g = torch.randn(512, device=device)
    extra_a.grad, extra_b.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b._step_cache.clear()
    opt_b.step()
    assert torch.equal(extra_a, extra_b)


# ---------------------------------------------------------------- host path: step counts, checks, split calls


def _op_case(device, shapes=((5000,), (0,), (300,), (64, 80)), seed=0):
    """Parameters, gradients and random states for a direct op call (one empty parameter)."""
    torch.manual_seed(seed)
    ps = [torch.randn(s, device=device) for s in shapes]
    gs = [torch.randn(s, device=device) for s in shapes]
    sts = []
    for s in shapes:
        n = math.prod(s)
        st = random_state(n, s, n >= 4096, "cpu", step=3)
        sts.append({k: v.to(device) for k, v in st.items()})
    return ps, gs, sts


def _op_lists(ps, gs, sts, device, **kw):
    args = dict(params=ps, grads=gs, state1=[s["state1"] for s in sts], state2=[s["state2"] for s in sts],
                absmax1=[s["absmax1"] for s in sts], absmax2=[s["absmax2"] for s in sts],
                steps=[s["step"] for s in sts], lr=torch.tensor(1e-3), code1=get_dynamic_map(True, device),
                code2=get_dynamic_map(False, device), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    args.update(kw)
    return args


@pytest.mark.parametrize("device", devices())
def test_op_increment_steps_equals_foreach_add_first(device):
    """increment_steps=True gives what torch._foreach_add_(steps, 1) before the
    call gave, bit for bit, the empty parameter's step count included."""
    a = _op_case(device)
    b = copy.deepcopy(a)
    torch._foreach_add_([s["step"] for s in a[2]], 1.0)
    ops.adamw8bit_step(**_op_lists(*a, device))
    ops.adamw8bit_step(**_op_lists(*b, device), increment_steps=True)
    for i, (pa, pb, sa, sb) in enumerate(zip(a[0], b[0], a[2], b[2])):
        assert_bitwise(pa, pb, f"param {i}")
        assert_state_equal(sa, sb, f"param {i}")
        assert sa["step"].item() == sb["step"].item() == 4.0, f"param {i}"


@pytest.mark.parametrize("device", devices())
def test_op_rejected_call_changes_nothing(device):
    """Every parameter is checked before any is written: a fault in the last
    one leaves the others, their states and their step counts untouched."""
    ps, gs, sts = _op_case(device)
    before = copy.deepcopy((ps, sts))
    gs[-1] = gs[-1].double()
    with pytest.raises(ValueError, match=r"argument 'grads\[3\]' must have dtype Float, got Double"):
        ops.adamw8bit_step(**_op_lists(ps, gs, sts, device), increment_steps=True)
    for i, (p, st, p0, st0) in enumerate(zip(ps, sts, *before)):
        assert_bitwise(p, p0, f"param {i}")
        assert_state_equal(st, st0, f"param {i}")
        assert st["step"].item() == st0["step"].item()


def test_op_index_base_numbers_messages():
    ps, gs, sts = _op_case("cpu")
    sts[2]["state2"] = sts[2]["state2"][:-1]
    with pytest.raises(ValueError, match=r"argument 'state2\[37\]' must have 300 elements, got 299"):
        ops.adamw8bit_step(**_op_lists(ps, gs, sts, "cpu"), index_base=35)


def test_call_slices():
    from lowbit.optim import adamw
    big = [4096 * 1024] * 256  # full fine-tuning, 1.07e9 parameters: 4 + 32 + 220 tensors per call
    assert adamw._call_slices(big) == [(0, 4), (4, 36), (36, 256)]
    lora = [16 * 4096, 4096 * 16] * 224  # 2^24 elements in the first call, the rest in the second
    assert adamw._call_slices(lora) == [(0, 256), (256, 448)]
    assert adamw._call_slices([16] * 448) == [(0, 448)]  # under 2^24 elements: one call
    assert adamw._call_slices([]) == [(0, 0)]
    assert adamw._call_slices([1 << 26]) == [(0, 1)]
    mixed = [1 << 27, 4096, 4096, 1 << 25, 1 << 25]  # a large first tensor makes its own call
    assert adamw._call_slices(mixed) == [(0, 1), (1, 5)]


def _split_everywhere(monkeypatch, first=2000):
    from lowbit.optim import adamw
    monkeypatch.setattr(adamw, "_split_calls", lambda device: True)
    monkeypatch.setattr(adamw, "_FIRST_CALL_ELEMS", first)
    monkeypatch.setattr(adamw, "_CALL_GROWTH", 1)


def test_split_calls_equal_one_call(monkeypatch):
    """A step split into several op calls (as on CUDA for large parameters)
    equals the step in one call, bit for bit, over several steps."""
    shapes = [(64, 80), (300,), (0,), (16, 16), (4096 + 7,), (70, 70), (5000,), (12,)]
    torch.manual_seed(5)
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = AdamW8bit(a, lr=1e-2, min_8bit_size=256)
    opt_b = AdamW8bit(b, lr=1e-2, min_8bit_size=256)
    for step in range(4):
        gs = [torch.randn(s) for s in shapes]
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        with monkeypatch.context() as m:
            _split_everywhere(m)
            opt_b._step_cache.clear()
            opt_b.step()
            slices = opt_b._collect(0, opt_b.param_groups[0], "AdamW8bit")[torch.device("cpu")]["slices"]
            assert len(slices) >= 3, slices
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"step {step} param {i}"
            assert_state_equal(opt_a.state[p], opt_b.state[q], f"step {step} param {i}")
            assert opt_a.state[p]["step"].item() == opt_b.state[q]["step"].item() == step + 1


@pytest.mark.parametrize("split", [False, True])
def test_kept_lists_still_checked(monkeypatch, split):
    """The optimizer keeps its argument lists between steps, but the op checks
    them on every call: a parameter whose size or layout changed in place
    (p.data = ...) is still refused, named by its index in the full list,
    and a rejected call leaves its parameters and their step counts as they were."""
    if split:
        _split_everywhere(monkeypatch, first=100)
    shapes = [(64, 80), (300,), (16, 16), (70, 70)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = AdamW8bit(ps, lr=1e-2, min_8bit_size=256)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    if split:
        assert len(opt._step_cache[0]["per_device"][torch.device("cpu")]["slices"]) > 1
    for change, match in (
        (lambda p: torch.randn(71, 70), r"argument 'grads\[3\]' has shape \[70, 70\] but 'params\[3\]' has shape "
                                        r"\[71, 70\]"),
        (lambda p: torch.randn(70, 70).t(), r"argument 'params\[3\]' must be contiguous"),
        (lambda p: torch.randn(70 * 71)[: 70 * 70].view(70, 70), None),  # still contiguous: fine
    ):
        last = ps[3]
        kept = last.data
        last.data = change(last)
        before = [p.detach().clone() for p in ps]
        steps = [opt.state[p]["step"].item() for p in ps]
        if match is None:
            opt.step()
        else:
            with pytest.raises(ValueError, match=match):
                opt.step()
            # the call that held parameter 3 changed nothing; split calls before it did their part
            assert torch.equal(ps[3], before[3]) and opt.state[ps[3]]["step"].item() == steps[3]
            if not split:
                assert all(torch.equal(p, q) for p, q in zip(ps, before))
                assert [opt.state[p]["step"].item() for p in ps] == steps
        last.data = kept
    opt.step()


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_paged_prefetch_policy(monkeypatch):
    calls = []
    real = ops.prefetch_managed
    monkeypatch.setattr(ops, "prefetch_managed", lambda ts: (calls.append(len(ts)), real(ts)))
    for mode, want in (("auto", [2]), ("always", [2, 2, 2]), ("never", [])):
        calls.clear()
        p = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))
        opt = PagedAdamW8bit([p], lr=1e-3, page_min_size=0, prefetch=mode)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        assert free > 2 * p.numel(), "the card is nearly full: auto would prefetch every step"
        assert calls == want, (mode, calls)
    with pytest.raises(ValueError, match="prefetch must be"):
        PagedAdamW8bit([p], prefetch="sometimes")
