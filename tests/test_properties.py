"""Property-based tests (hypothesis) of the CPU ops against plain-PyTorch references.

Each test draws shapes (1-D to 3-D, odd and prime sizes), block sizes, dtypes,
quant types, double quantization and value distributions, builds the tensors
from a drawn integer `seed` (so a falsifying example printed by hypothesis is
reproducible as it stands), and compares lowbit with:

- tests/reference.py for 4-bit and 8-bit blockwise quantization (exact bytes,
  exact absmax, exact dequantized values),
- a float64 matmul of the float32-dequantized weight for matmul_4bit, by the
  rule of tests/test_gemm.py (error at most twice that of "dequantize to the
  dtype, then torch matmul", plus a small floor),
- the float32 reference step of tests/test_optim.py for AdamW8bit (bitwise).

Magnitudes stay where the drawn dtype represents them (fp16 below 65504, no
block absmax below 1e-37: blocks with a subnormal absmax, whose reciprocal
would overflow, have test_subnormal_block_absmax_round_trip); exact ties
are drawn on purpose ("few_values" and "constant" distributions) because both
sides must break them the same way, so they cannot make a test flaky.

Example counts (the examples(n) decorators) add up to 1270 per run; the file runs in
well under a minute on a 2-core CPU. LOWBIT_PROPERTY_SCALE=10 runs ten times as many.
"""
import math
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch  # noqa: E402

from lowbit import functional as F  # noqa: E402
from lowbit.functional import QuantState, get_dynamic_map  # noqa: E402
from lowbit.optim import AdamW8bit  # noqa: E402

import reference as ref  # noqa: E402
from conftest import devices  # noqa: E402
from test_optim import assert_bitwise, assert_state_equal, call_op, random_state, ref_step  # noqa: E402

# Scale every test's example count, e.g. LOWBIT_PROPERTY_SCALE=10 for a long run.
SCALE = float(os.environ.get("LOWBIT_PROPERTY_SCALE", "1"))
settings.register_profile(
    "lowbit",
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def examples(n):
    """The settings of one test: n examples (times LOWBIT_PROPERTY_SCALE), no deadline."""
    return settings(settings.get_profile("lowbit"), max_examples=max(1, int(n * SCALE)))


BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Sizes near block and vector boundaries, and primes.
SIZES = [1, 2, 3, 5, 7, 13, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257, 509, 511, 512, 1021, 1024,
         2039, 2048, 2053]
DISTS = ["normal", "uniform", "heavy", "zero_blocks", "few_values", "constant"]
# log10 of the value scale each dtype takes without overflow (blocks with a
# subnormal absmax: test_subnormal_block_absmax_round_trip below).
LOG_SCALE = {torch.float32: (-30, 34), torch.bfloat16: (-30, 34), torch.float16: (-6, 3)}
SIGNED = get_dynamic_map(True, "cpu")
UNSIGNED = get_dynamic_map(False, "cpu")


# ---------------------------------------------------------------- strategies


@st.composite
def shapes(draw, max_numel=3000, max_ndim=3):
    ndim = draw(st.integers(1, max_ndim))
    dims, room = [], max_numel
    for _ in range(ndim):
        d = draw(st.one_of(st.sampled_from([s for s in SIZES if s <= room] or [1]), st.integers(1, max(1, room))))
        dims.append(d)
        room = max(1, room // d)
    return tuple(draw(st.permutations(dims)))


@st.composite
def weights(draw, max_numel=3000, max_ndim=3, dtypes=DTYPES):
    """(x, meta): a tensor of a drawn shape, dtype, distribution and scale."""
    shape = draw(shapes(max_numel, max_ndim))
    dtype = draw(st.sampled_from(dtypes))
    dist = draw(st.sampled_from(DISTS))
    lo, hi = LOG_SCALE[dtype]
    log_scale = draw(st.one_of(st.integers(lo, hi), st.just(0)))
    seed = draw(st.integers(0, 2**31 - 1))
    zero_block = draw(st.sampled_from([32, 64, 256]))
    x = make_values(shape, dtype, dist, log_scale, seed, zero_block)
    return x, dict(shape=shape, dtype=dtype, dist=dist, log_scale=log_scale, seed=seed)


def make_values(shape, dtype, dist, log_scale, seed, zero_block=64):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dist == "uniform":
        x = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    elif dist == "heavy":  # a log-normal scale mixture of normals: tails over several decades
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(n, generator=g,
                                                                                        dtype=torch.float64))
    elif dist == "few_values":  # many exact ties, scaled values exactly +-1, +-1/2, +-1/3 ...
        x = torch.randint(-3, 4, (n,), generator=g).double()
    elif dist == "constant":
        x = torch.full((n,), -1.0 if seed % 2 else 1.0, dtype=torch.float64)
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if dist == "zero_blocks":  # whole blocks of zeros, and a zero tail
            nb = -(-n // zero_block)
            keep = torch.rand(nb, generator=g) < 0.5
            x = x * keep.double().repeat_interleave(zero_block)[:n]
            if n > 3:
                x[-(n // 3):] = 0
    x = x * 10.0 ** log_scale
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype).view(shape)


def sane_blocks(x, blocksize):
    """No block absmax whose float32 reciprocal overflows (a subnormal absmax below 1/FLT_MAX)."""
    _, am = ref.blocks_absmax(x, blocksize)
    return not bool(((am > 0) & (am < 1e-37)).any())


# ---------------------------------------------------------------- references


def ref_double_quant(am):
    """SPEC section 4, with lowbit's documented offset (the float64 mean of absmax rounded to float32)."""
    offset = am.double().mean().float() if am.numel() else torch.zeros(())
    q, nested = ref.quantize_8bit(am - offset, SIGNED, 256)
    rec = SIGNED[q.long()] * nested.repeat_interleave(256)[: am.numel()] + offset
    return q, nested, offset, rec


def half_max_gap(code):
    c = code.sort().values
    return ((c[1:] - c[:-1]).max() / 2).item()


# ---------------------------------------------------------------- 1. 4-bit quantize / dequantize


@examples(400)
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES), quant_type=st.sampled_from(["nf4", "fp4"]),
       dq=st.booleans(), out_dtype=st.sampled_from(DTYPES))
def test_quantize_4bit_matches_reference(w, blocksize, quant_type, dq, out_dtype):
    x, meta = w
    assume(sane_blocks(x, blocksize))
    rp, ra = ref.quantize_4bit(x, blocksize, quant_type)

    # the raw op
    packed_op, absmax_op = torch.ops.lowbit.quantize_4bit(x, blocksize, quant_type)
    assert packed_op.dtype == torch.uint8 and packed_op.shape == rp.shape
    assert torch.equal(absmax_op, ra), "op absmax differs from the reference"
    diff = (packed_op != rp).sum().item()
    assert diff == 0, f"op: {diff} of {rp.numel()} packed bytes differ from the reference"

    # the functional API, with or without double quantization
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=dq)
    assert torch.equal(packed, rp)
    assert state.shape == x.shape and state.dtype == x.dtype and state.blocksize == blocksize
    code = F.get_4bit_code(quant_type)
    if dq:
        q, nested, offset, am = ref_double_quant(ra)
        assert torch.equal(state.offset, offset), (state.offset.item(), offset.item())
        assert torch.equal(state.absmax, q), "double-quantized absmax codes differ from the reference"
        assert torch.equal(state.nested_absmax, nested)
        assert torch.equal(state.dequantized_absmax(), am)
    else:
        am = ra
        assert torch.equal(state.absmax, ra)

    # dequantize: exactly the reference (float32 math, one cast)
    out = F.dequantize_4bit(packed, state, out_dtype)
    want = ref.dequantize_4bit(rp, am, code, blocksize, x.shape, out_dtype)
    assert out.shape == x.shape and out.dtype == out_dtype
    assert torch.equal(out, want), \
        f"dequantize differs from the reference: max abs diff {(out.double() - want.double()).abs().max().item()}"
    out_op = torch.ops.lowbit.dequantize_4bit(packed, *state.quant_args()[:3], list(x.shape), out_dtype,
                                              *state.quant_args()[3:])
    assert torch.equal(out_op, out)

    # round-trip error: at most half the widest code gap times the block scale,
    # plus what double quantization moved the scale, plus the output rounding.
    if out_dtype == x.dtype:
        n = x.numel()
        true_am = ra.double().repeat_interleave(blocksize)[:n]
        rec_am = am.double().repeat_interleave(blocksize)[:n]
        fi = torch.finfo(out_dtype)
        # A float16 block at the top of its range can get a double-quantized
        # scale above 65504; its largest codes then cast to inf (README,
        # "Behaviour worth knowing"), which no error bound covers.
        assume(bool((rec_am * code.abs().max().double() <= fi.max).all()))
        bound = (half_max_gap(code) * true_am * (1 + 1e-5) + (rec_am - true_am).abs()
                 + fi.eps * rec_am + fi.smallest_normal * fi.eps)
        err = (out.double().view(-1) - x.double().view(-1)).abs()
        bad = err > bound
        assert not bad.any(), (f"{bad.sum().item()} elements exceed the bound, e.g. x={x.view(-1)[bad][0].item()} "
                               f"-> {out.view(-1)[bad][0].item()} (block absmax {true_am[bad][0].item()})")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", devices())
def test_subnormal_block_absmax_round_trip(quant_type, dtype, device):
    # absmax below 1/FLT_MAX: its reciprocal overflows unless the block is scaled up first.
    x = torch.tensor([1e-39, 5e-40, 0.0, -2.5e-40], dtype=torch.float32).to(dtype).to(device)
    packed, state = F.quantize_4bit(x, blocksize=32, quant_type=quant_type, double_quant=False)
    out = F.dequantize_4bit(packed, state, torch.float32).cpu()
    am = state.absmax.item()
    err = (out - x.float().cpu()).abs()
    rq, ra = ref.quantize_4bit(x.cpu(), 32, quant_type)
    assert torch.equal(packed.cpu().view(-1), rq.view(-1)) and torch.equal(state.absmax.cpu(), ra)
    assert (err <= half_max_gap(state.code) * am * (1 + 1e-5)).all(), f"x={x.tolist()} -> {out.tolist()}"


# ---------------------------------------------------------------- 2. 8-bit blockwise


@examples(250)
@given(w=weights(max_numel=5000), blocksize=st.sampled_from(BLOCKSIZES), signed=st.booleans(),
       out_dtype=st.sampled_from(DTYPES), use_functional=st.booleans())
def test_quantize_8bit_blockwise_matches_reference(w, blocksize, signed, out_dtype, use_functional):
    x, meta = w
    assume(sane_blocks(x, blocksize))
    code = SIGNED if signed else UNSIGNED
    if not signed:
        x = x.abs()
    if use_functional:
        q, am = F.quantize_blockwise(x, code, blocksize)
    else:
        q, am = torch.ops.lowbit.quantize_8bit_blockwise(x, code, blocksize)
    rq, ra = ref.quantize_8bit(x, code, blocksize)
    assert q.shape == x.shape and q.dtype == torch.uint8
    assert torch.equal(am, ra)
    diff = (q != rq).sum().item()
    assert diff == 0, f"{diff} of {q.numel()} codes differ from the reference (nearest entry, ties lower)"
    if use_functional:
        d = F.dequantize_blockwise(q, am, code, blocksize, out_dtype)
    else:
        d = torch.ops.lowbit.dequantize_8bit_blockwise(q, am, code, blocksize, out_dtype)
    want = ref.dequantize_8bit(rq, ra, code, blocksize, out_dtype)
    assert d.dtype == out_dtype and torch.equal(d, want)


# ---------------------------------------------------------------- 3. QuantState state_dict round trip


@examples(100)
@given(w=weights(max_numel=2000, max_ndim=2), blocksize=st.sampled_from(BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4"]), dq=st.booleans(),
       prefix=st.sampled_from(["", "weight.", "model.layers.0.mlp.up_proj.weight."]), via_safetensors=st.booleans())
def test_quant_state_dict_round_trip(w, blocksize, quant_type, dq, prefix, via_safetensors):
    x, meta = w
    assume(sane_blocks(x, blocksize))
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=dq)
    sd = state.to_state_dict(prefix)
    if via_safetensors:
        from safetensors.torch import load, save

        sd = load(save({k: v.contiguous() for k, v in sd.items()}))
    back = QuantState.from_state_dict(sd, prefix)
    assert back.shape == state.shape and back.dtype == state.dtype
    assert back.blocksize == state.blocksize and back.quant_type == state.quant_type
    assert back.nested == state.nested and back.nested_blocksize == state.nested_blocksize
    for name in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
        a, b = getattr(back, name), getattr(state, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(F.dequantize_4bit(packed, back), F.dequantize_4bit(packed, state))
    # and the state dict itself survives a second trip unchanged
    sd2 = back.to_state_dict(prefix)
    assert sd2.keys() == sd.keys() and all(torch.equal(sd2[k], sd[k]) for k in sd)


# ---------------------------------------------------------------- 4. matmul_4bit forward and backward


def check_close(out, ref64, base, scale64, what):
    """test_gemm's rule: err(out) <= 2 * err(base) + floor, errors as Frobenius norms
    against the float64 reference. The floor is 1e-6 of ||ref|| plus 1e-6 of
    || |x| @ |W|^T || (the size of the terms summed): for a handful of outputs
    that cancel, float32 accumulation error is not small relative to ||ref||
    alone, and two different summation orders may then differ by more than 2x."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).norm().item()
    err_base = (base.double() - ref64).norm().item()
    floor = 1e-6 * ref64.norm().item() + 1e-6 * scale64.norm().item() + 1e-30
    assert err <= 2 * err_base + floor, f"{what}: error {err:.3e} vs baseline {err_base:.3e} (floor {floor:.1e})"


@st.composite
def gemm_cases(draw):
    N = draw(st.one_of(st.sampled_from([1, 3, 7, 16, 31, 33, 64]), st.integers(1, 80)))
    K = draw(st.one_of(st.sampled_from([1, 5, 31, 32, 64, 127, 256, 257, 333, 509, 512]), st.integers(1, 600)))
    assume(N * K <= 24000)
    lead = draw(st.sampled_from([(), (), (2,), (3, 2)]))
    M = draw(st.one_of(st.sampled_from([1, 2, 5]), st.integers(0, 17)))
    return dict(N=N, K=K, M=M, lead=lead, blocksize=draw(st.sampled_from(BLOCKSIZES)),
                quant_type=draw(st.sampled_from(["nf4", "fp4"])), dq=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                w_scale=draw(st.sampled_from([1e-3, 0.05, 1.0])), x_scale=draw(st.sampled_from([1e-2, 1.0, 4.0])),
                seed=draw(st.integers(0, 2**31 - 1)))


def gemm_setup(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, K, dtype = c["N"], c["K"], c["dtype"]
    w = torch.randn(N, K, generator=g) * c["w_scale"]
    packed, state = F.quantize_4bit(w, blocksize=c["blocksize"], quant_type=c["quant_type"], double_quant=c["dq"])
    W32 = F.dequantize_4bit(packed, state, torch.float32).double()
    Wd = F.dequantize_4bit(packed, state, dtype)
    x = (torch.randn(*c["lead"], c["M"], K, generator=g) * c["x_scale"]).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if c["bias"] else None
    return g, packed, state, W32, Wd, x, b


@examples(150)
@given(c=gemm_cases())
def test_matmul_4bit_forward(c):
    g, packed, state, W32, Wd, x, b = gemm_setup(c)
    out = F.matmul_4bit(x, packed, state, b)
    assert out.shape == (*c["lead"], c["M"], c["N"]) and out.dtype == c["dtype"]
    ref64 = x.double() @ W32.t()
    base = x @ Wd.t()
    if b is not None:
        ref64 = ref64 + b.double()
        base = base + b
    check_close(out, ref64, base, x.double().abs() @ W32.abs().t(), str(c))


@examples(120)
@given(c=gemm_cases())
def test_matmul_4bit_backward(c):
    g, packed, state, W32, Wd, x, b = gemm_setup(c)
    x = x.requires_grad_()
    if b is not None:
        b = b.requires_grad_()
    out = F.matmul_4bit(x, packed, state, b)
    gout = torch.randn(out.shape, generator=g).to(c["dtype"])
    out.backward(gout)
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    check_close(x.grad, gout.double() @ W32, gout @ Wd, gout.double().abs() @ W32.abs(), "grad_x " + str(c))
    if b is not None:
        g2 = gout.reshape(-1, c["N"])
        assert b.grad.shape == b.shape and b.grad.dtype == b.dtype
        check_close(b.grad, g2.double().sum(0), g2.sum(0), g2.double().abs().sum(0), "grad_bias " + str(c))


# ---------------------------------------------------------------- 5. AdamW8bit


@st.composite
def hyper(draw):
    lr = draw(st.one_of(st.just(0.0), st.floats(1e-6, 0.1)))
    b1 = draw(st.one_of(st.sampled_from([0.0, 0.9]), st.floats(0.0, 0.99)))
    b2 = draw(st.one_of(st.sampled_from([0.5, 0.999]), st.floats(0.5, 0.9999)))
    eps = draw(st.sampled_from([1e-10, 1e-8, 1e-6, 1e-3]))
    wd = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5)))
    return lr, (b1, b2), eps, wd


def make_grad(shape, dtype, kind, log_scale, g):
    x = torch.randn(shape, generator=g) * 10.0 ** log_scale
    if kind == "sparse":  # many exact zeros
        x = x * (torch.rand(shape, generator=g) < 0.2)
    elif kind == "non_finite":
        bad = torch.rand(shape, generator=g) < 0.05
        x[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
            torch.randint(0, 3, (int(bad.sum()),), generator=g)]
    return x.to(dtype)


@examples(150)
@given(shapes_=st.lists(shapes(max_numel=6000), min_size=1, max_size=3),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3), hp=hyper(),
       min_8bit_size=st.sampled_from([0, 300, 4096, 10**9]), steps=st.integers(1, 2),
       grad_kind=st.sampled_from(["normal", "normal", "sparse", "non_finite"]),
       grad_log_scale=st.integers(-5, 2), seed=st.integers(0, 2**31 - 1))
def test_adamw8bit_steps_match_reference(shapes_, dtypes, hp, min_8bit_size, steps, grad_kind, grad_log_scale, seed):
    """The optimizer (zero initial state, one or two steps) against test_optim's float32 reference."""
    lr, betas, eps, wd = hp
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dt)) for s, dt in zip(shapes_, dtypes)]
    ref_p = [p.detach().clone() for p in params]
    ref_st = []
    for p in params:
        n = p.numel()
        if n >= min_8bit_size:
            nb = -(-n // 256)
            ref_st.append({"step": torch.tensor(0.0), "state1": torch.full(p.shape, 127, dtype=torch.uint8),
                           "state2": torch.zeros(p.shape, dtype=torch.uint8), "absmax1": torch.zeros(nb),
                           "absmax2": torch.zeros(nb)})
        else:
            ref_st.append({"step": torch.tensor(0.0), "state1": torch.zeros(p.shape), "state2": torch.zeros(p.shape),
                           "absmax1": torch.zeros(0), "absmax2": torch.zeros(0)})
    opt = AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, min_8bit_size=min_8bit_size)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = make_grad(p.shape, p.dtype, grad_kind, grad_log_scale, g)
            ref_p[i], ref_st[i] = ref_step(ref_p[i], p.grad, ref_st[i], lr, betas, eps, wd)
        opt.step()
        for i, p in enumerate(params):
            what = f"step {t + 1} param {i} {tuple(p.shape)} {p.dtype}"
            st_ = opt.state[p]
            assert (st_["state1"].dtype == torch.uint8) == (p.numel() >= min_8bit_size), what
            assert_bitwise(p, ref_p[i], what)
            assert_state_equal(st_, ref_st[i], what)
            assert st_["step"].item() == t + 1


@examples(100)
@given(shape=shapes(max_numel=6000), dtype=st.sampled_from(DTYPES), eight_bit=st.booleans(), hp=hyper(),
       start_step=st.integers(0, 1000), grad_kind=st.sampled_from(["normal", "sparse", "non_finite"]),
       grad_log_scale=st.integers(-5, 2), seed=st.integers(0, 2**31 - 1))
def test_adamw8bit_op_random_state_matches_reference(shape, dtype, eight_bit, hp, start_step, grad_kind,
                                                     grad_log_scale, seed):
    """The op from random (non-zero) 8-bit or float32 states at a random step count."""
    lr, betas, eps, wd = hp
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    p = torch.randn(shape, generator=g).to(dtype)
    grad = make_grad(shape, dtype, grad_kind, grad_log_scale, g)
    state = random_state(n, shape, eight_bit, "cpu", step=start_step)
    wp, wst = ref_step(p, grad, state, lr, betas, eps, wd)
    sts = [{k: v.clone() for k, v in state.items()}]
    call_op([p], [grad], sts, lr, betas, eps, wd, "cpu")
    assert_bitwise(p, wp, "param")
    assert_state_equal(sts[0], wst, "state")
    assert sts[0]["step"].item() == start_step + 1


@pytest.mark.parametrize("device", devices())
def test_subnormal_block_absmax_8bit(device):
    # 8-bit blockwise (double quantization, the optimizer states) takes the same scaling.
    x = torch.tensor([1e-39, -5e-40, 0.0, 2.5e-40, 3e-45] + [0.0] * 251, dtype=torch.float32)
    q, am = torch.ops.lowbit.quantize_8bit_blockwise(x.to(device), SIGNED.to(device), 256)
    rq, ra = ref.quantize_8bit(x, SIGNED, 256)
    assert torch.equal(q.cpu(), rq) and torch.equal(am.cpu(), ra)
    out = torch.ops.lowbit.dequantize_8bit_blockwise(q, am, SIGNED.to(device), 256, torch.float32).cpu()
    assert out[2] == 0.0 and (out[:4] - x[:4]).abs().max() <= 0.01 * am.item()
