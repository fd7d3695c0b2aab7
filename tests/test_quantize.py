"""4-bit and 8-bit blockwise quantization against the plain-PyTorch reference,
across devices, and the format's edge cases."""
import math

import pytest
import torch

import lowbit
from lowbit import functional as F
from lowbit import ops

import reference as ref
from conftest import HAS_CUDA, devices, poison_allocator

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (64,), (3, 5), (33, 65), (129, 257), (4096 + 3,), (2, 3, 301)]


def draw(shape, dtype, kind="normal", device="cpu"):
    if kind == "normal":
        x = torch.randn(shape)
    elif kind == "uniform":
        x = torch.rand(shape) * 2 - 1
    else:  # heavy-tailed: Student-t with 2 degrees of freedom
        x = torch.distributions.StudentT(2.0).sample(shape)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_matches_reference(device, quant_type, blocksize, dtype):
    for shape in SHAPES:
        for kind in ("normal", "uniform", "heavy"):
            x = draw(shape, dtype, kind, device)
            poison_allocator(device)
            packed, absmax = ops.quantize_4bit(x, blocksize, quant_type)
            rp, ra = ref.quantize_4bit(x.cpu(), blocksize, quant_type)
            assert packed.shape == rp.shape and packed.dtype == torch.uint8
            assert torch.equal(absmax.cpu(), ra), (shape, kind)
            assert torch.equal(packed.cpu(), rp), (shape, kind, (packed.cpu() != rp).sum().item())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_4bit_matches_reference(device, quant_type, blocksize, out_dtype):
    code = F.get_4bit_code(quant_type, device)
    for shape in SHAPES:
        x = draw(shape, torch.float32, "normal", device)
        packed, absmax = ops.quantize_4bit(x, blocksize, quant_type)
        poison_allocator(device)
        out = ops.dequantize_4bit(packed, absmax, code, blocksize, shape, out_dtype)
        want = ref.dequantize_4bit(packed.cpu(), absmax.cpu(), code.cpu(), blocksize, shape, out_dtype)
        assert out.shape == torch.Size(shape) and out.dtype == out_dtype
        assert torch.equal(out.cpu(), want), shape


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_8bit_matches_reference(device, blocksize, signed, dtype):
    code = F.get_dynamic_map(signed, device)
    for shape in [(1,), (255,), (256,), (1000, 3), (70001,)]:
        x = draw(shape, dtype, "normal", device)
        if not signed:
            x = x.abs()
        poison_allocator(device)
        q, am = ops.quantize_8bit_blockwise(x, code, blocksize)
        rq, ra = ref.quantize_8bit(x.cpu(), code.cpu(), blocksize)
        assert torch.equal(am.cpu(), ra)
        assert torch.equal(q.cpu(), rq)
        poison_allocator(device)
        for out_dtype in DTYPES:
            d = ops.dequantize_8bit_blockwise(q, am, code, blocksize, out_dtype)
            assert torch.equal(d.cpu(), ref.dequantize_8bit(rq, ra, code.cpu(), blocksize, out_dtype))


@pytest.mark.parametrize("device", devices())
def test_nf4_exact_midpoints_go_to_the_lower_code(device):
    # With a 1.0 in the block the scale is exactly 1, so each element is scaled
    # onto an NF4 midpoint exactly (the float32 of SPEC's literal), then one ulp
    # above it: the tie takes the lower code, the next float the upper one.
    # (Random inputs land on a midpoint only rarely; this pins those cases.)
    mids = ref.NF4_MIDPOINTS
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    x = torch.cat([mids, above, torch.tensor([1.0])]).to(device)
    packed, absmax = ops.quantize_4bit(x, 64, "nf4")
    codes = ref.unpack(packed.cpu(), x.numel())
    assert absmax.item() == 1.0
    assert codes[:15].tolist() == list(range(15)) and codes[15:30].tolist() == list(range(1, 16))
    rp, _ = ref.quantize_4bit(x.cpu(), 64, "nf4")
    assert torch.equal(packed.cpu(), rp)


def test_nearest_8bit_ties_and_range():
    code = F.get_dynamic_map(True)
    mids = (code[:-1] + code[1:]) * 0.5
    # With a 1.0 in the block the scale is exactly 1: exact midpoints go to the lower entry.
    q, _ = ops.quantize_8bit_blockwise(torch.cat([mids, torch.tensor([1.0])]), code, 4096)
    assert torch.equal(q[:-1], torch.arange(255, dtype=torch.uint8)) and q[-1] == 255
    # Values past the map's smallest entry (-0.99296875) go to index 0.
    q, _ = ops.quantize_8bit_blockwise(torch.tensor([-1.0, 0.0, 0.5]), code, 32)
    assert q.tolist() == [0, 127, int(ref.nearest_8bit(torch.tensor([0.5]), code))]


def test_dynamic_maps_shape():
    s, u = F.get_dynamic_map(True), F.get_dynamic_map(False)
    assert s.shape == u.shape == (256,)
    assert torch.all(s[1:] > s[:-1]) and torch.all(u[1:] > u[:-1])
    assert s[127] == 0 and s[255] == 1 and s[0].item() == pytest.approx(-0.99296875)
    assert u[0] == 0 and u[255] == 1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 1024])
def test_double_quant_roundtrip(device, quant_type, blocksize):
    x = torch.randn(517, 263, device=device, dtype=torch.bfloat16)
    packed, st = F.quantize_4bit(x, blocksize, quant_type, double_quant=True)
    p_plain, st_plain = F.quantize_4bit(x, blocksize, quant_type, double_quant=False)
    assert torch.equal(packed, p_plain)
    assert st.nested and st.absmax.dtype == torch.uint8
    assert st.nested_absmax.numel() == math.ceil(st.absmax.numel() / 256)
    true_am = st_plain.absmax
    rec = st.dequantized_absmax()
    # Nearest-entry rounding: each rebuilt scale is within half the widest gap
    # of the signed map, times its nested block's absmax, of the true one, plus
    # the float32 rounding of (absmax - offset) and of code * absmax + offset.
    # (The map's end, -0.99296875, is exactly half its widest gap from -1, so
    # the block with the smallest absmax can sit on the bound: without the
    # rounding term this failed for 2 of 300 seeds.)
    code = st.nested_code
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    bound = (half_gap * st.nested_absmax.repeat_interleave(256)[: true_am.numel()] * (1 + 1e-5) + 1e-7
             + 2 * torch.finfo(torch.float32).eps * true_am.abs())
    assert torch.all((rec - true_am).abs() <= bound)
    assert ((rec - true_am).abs() / true_am).median() < 0.01
    # The fused nested dequantize equals dequantizing with the rebuilt float scales.
    poison_allocator(device)
    out = F.dequantize_4bit(packed, st)
    want = ops.dequantize_4bit(packed, rec, st.code, blocksize, x.shape, torch.bfloat16)
    assert torch.equal(out, want)
    # offset: float64 mean of absmax rounded to float32
    assert st.offset.item() == true_am.double().mean().float().item()


@pytest.mark.parametrize("quant_type,expected", [("nf4", 0.0925), ("fp4", 0.122)])
def test_dequantization_error_normal(quant_type, expected):
    x = torch.randn(1024, 1024)
    packed, st = F.quantize_4bit(x, 64, quant_type, double_quant=False)
    err = ((F.dequantize_4bit(packed, st) - x).norm() / x.norm()).item()
    # At block 64 on N(0,1) bitsandbytes gives about 0.092 (NF4) and 0.122 (FP4).
    assert abs(err - expected) < 0.01, err


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_block_encodes_zero(device, quant_type):
    x = torch.randn(256, device=device)
    x[64:128] = 0
    packed, st = F.quantize_4bit(x, 64, quant_type, double_quant=False)
    assert st.absmax[1].item() == 0
    zc = 0x77 if quant_type == "nf4" else 0x00
    assert torch.all(packed.view(-1)[32:64] == zc)
    out = F.dequantize_4bit(packed, st)
    assert torch.all(out[64:128] == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_an_error(device, bad):
    x = torch.randn(10, 64, device=device)
    x[3, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*block 3 \(flat elements 192\.\.255\)"):
        F.quantize_4bit(x)
    # Unchecked, the op flags the block with a NaN absmax and leaves the others intact.
    packed, st = F.quantize_4bit(x, double_quant=False, check_finite=False)
    assert torch.isnan(st.absmax[3]) and torch.isfinite(st.absmax[torch.arange(10) != 3]).all()


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_input(device):
    base = torch.randn(300, 200, device=device, dtype=torch.float16)
    for x in (base.t(), base[:, ::2], base[1:, 3:]):
        p1, s1 = F.quantize_4bit(x, 64)
        p2, s2 = F.quantize_4bit(x.contiguous(), 64)
        assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    # unaligned storage offset into a packed buffer
    packed, st = F.quantize_4bit(torch.randn(1000, device=device), 64, double_quant=False)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)
    buf[1:] = packed.view(-1)
    out = ops.dequantize_4bit(buf[1:], st.absmax, st.code, 64, (1000,), torch.float32)
    assert torch.equal(out, F.dequantize_4bit(packed, st, torch.float32))


@pytest.mark.parametrize("device", devices())
def test_empty_tensor(device):
    packed, st = F.quantize_4bit(torch.empty(0, 16, device=device))
    assert packed.shape == (0, 1) and st.absmax.numel() == 0
    out = F.dequantize_4bit(packed, st)
    assert out.shape == (0, 16)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_byte_identical(quant_type, blocksize, dtype):
    for shape in [(4097,), (333, 77), (1024, 1024)]:
        x = draw(shape, dtype, "heavy")
        pc, sc = F.quantize_4bit(x, blocksize, quant_type)
        pg, sg = F.quantize_4bit(x.cuda(), blocksize, quant_type)
        assert torch.equal(pc, pg.cpu())
        assert torch.equal(sc.absmax, sg.absmax.cpu())
        assert torch.equal(sc.nested_absmax, sg.nested_absmax.cpu())
        assert torch.equal(sc.offset, sg.offset.cpu())
        assert torch.equal(F.dequantize_4bit(pc, sc), F.dequantize_4bit(pg, sg).cpu())


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_non_default_stream_and_device_mismatch():
    x = torch.randn(4096, 64, device="cuda")
    want_p, want_s = F.quantize_4bit(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        p, st = F.quantize_4bit(x)
        out = F.dequantize_4bit(p, st)
    s.synchronize()
    assert torch.equal(p, want_p) and torch.equal(out, F.dequantize_4bit(want_p, want_s))
    with pytest.raises(ValueError, match="'absmax' is on cpu but 'packed' is on cuda"):
        ops.dequantize_4bit(p, want_s.dequantized_absmax().cpu(), st.code, 64, x.shape, torch.float32)
