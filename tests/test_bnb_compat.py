"""bitsandbytes as an oracle: same bytes, same scales, each library reads the
other's output. Skipped when bitsandbytes is not installed."""
import json

import pytest
import torch

from lowbit import functional as F

import reference as ref
from conftest import devices

bnbF = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def codes(packed):
    p = packed.reshape(-1).cpu()
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)


def bnb_state(st):
    """A bitsandbytes QuantState holding lowbit's tensors."""
    from bitsandbytes.functional import QuantState as BQS

    state2 = None
    if st.nested:
        state2 = BQS(absmax=st.nested_absmax, code=st.nested_code, blocksize=st.nested_blocksize, dtype=torch.float32)
    return BQS(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize, quant_type=st.quant_type,
               dtype=st.dtype, offset=st.offset, state2=state2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_same_codes_and_absmax_as_bnb(device, blocksize, dtype, quant_type):
    if device == "cpu" and blocksize == 32:
        pytest.skip("bnb's CPU path does not take blocksize 32")
    for shape in [(1024, 1024), (333, 77), (4097,)]:
        x = torch.randn(shape, dtype=dtype, device=device)
        bp, bs = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        lp, ls = F.quantize_4bit(x, blocksize, quant_type, double_quant=False)
        # All-zero blocks are the documented exception (lowbit: absmax 0 and the
        # code of 0.0; bnb's CPU path clamps absmax to 1e-38, its CUDA kernel
        # writes code 0); a short tail block of 16-bit randn can be all zero.
        live = ls.absmax > 0
        assert torch.equal(bs.absmax[live], ls.absmax[live])
        assert torch.all(bs.absmax[~live] <= 1e-38)
        if not live.all():
            continue
        assert torch.equal(bs.code.cpu(), ls.code.cpu())
        if device == "cuda":
            # bnb's CUDA kernel is built with fast math: its 1/absmax is an
            # approximate reciprocal, so a scaled value sitting within an ulp or
            # two of a code threshold can round the other way (visible with
            # 16-bit inputs, whose scaled values land on FP4's simple thresholds
            # exactly). lowbit uses the IEEE reciprocal, identical on CPU and GPU.
            a, b = codes(bp), codes(lp)
            bad = (a != b).nonzero().flatten()
            if bad.numel():
                s = (x.float().reshape(-1)[bad] * (1.0 / ls.absmax.repeat_interleave(blocksize)[bad])).abs().cpu()
                table = ref.FP4_THRESHOLDS if quant_type == "fp4" else ref.NF4_MIDPOINTS.abs()
                dist = (s[:, None] - table[None, :]).abs().min(dim=1).values
                assert torch.all(dist <= 4 * torch.finfo(torch.float32).eps * s), (s, dist)
                assert bad.numel() < 1e-3 * a.numel()
        elif quant_type == "nf4":
            # bnb's vectorised CPU kernels very rarely round a value sitting on a
            # code boundary the other way; its CUDA kernel is the reference. Every
            # difference must be such a value (within an ulp or two of a
            # midpoint), and they must be rare: one in a small tensor is allowed.
            a, b = codes(bp), codes(lp)
            bad = (a != b).nonzero().flatten()
            if bad.numel():
                s = (x.float().reshape(-1)[bad] * (1.0 / ls.absmax.repeat_interleave(blocksize)[bad])).cpu()
                dist = (s[:, None] - ref.NF4_MIDPOINTS[None, :]).abs().min(dim=1).values
                assert torch.all(dist <= 4 * torch.finfo(torch.float32).eps * s.abs()), (s, dist)
            assert bad.numel() <= 1 + 1e-5 * a.numel()
        else:
            # bnb's CPU FP4 paths do not reproduce its own CUDA kernel (which
            # lowbit follows, SPEC section 2): they round at other thresholds and
            # give tiny values the other sign of zero. Only the accuracy must agree.
            def err(d):
                return ((d.float() - x.float()).norm() / x.float().norm()).item()

            e_bnb, e_low = err(bnbF.dequantize_4bit(bp, bs)), err(F.dequantize_4bit(lp, ls))
            assert abs(e_bnb - e_low) < 0.02 * e_bnb, (e_bnb, e_low)
            assert (codes(bp) != codes(lp)).float().mean() < 0.1


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cross_dequantize(device, quant_type, double_quant):
    x = torch.randn(515, 300, dtype=torch.bfloat16, device=device)
    # lowbit quantizes, bnb dequantizes
    lp, ls = F.quantize_4bit(x, 64, quant_type, double_quant=double_quant)
    assert torch.equal(bnbF.dequantize_4bit(lp, bnb_state(ls)), F.dequantize_4bit(lp, ls))
    # bnb quantizes, lowbit dequantizes
    bp, bs = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    ls2 = F.QuantState.from_state_dict(bs.as_dict(packed=True), device=device)
    assert torch.equal(F.dequantize_4bit(bp, ls2), bnbF.dequantize_4bit(bp, bs))


@pytest.mark.parametrize("device", devices())
def test_double_quant_close_to_bnb(device):
    x = torch.randn(2048, 1024, device=device)
    bp, bs = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    lp, ls = F.quantize_4bit(x, 64, "nf4", double_quant=True)
    assert (codes(bp) != codes(lp)).float().mean() < (1e-12 if device == "cuda" else 1e-5)
    # The offset is the same mean (lowbit sums in float64): equal or one ulp apart.
    assert abs(bs.offset.item() - ls.offset.item()) <= 1e-6 * abs(bs.offset.item())
    assert torch.allclose(bs.state2.absmax, ls.nested_absmax, rtol=1e-6, atol=0)
    # bnb's CPU 8-bit quantizer uses a coarse lookup table and is sometimes
    # one entry off the nearest; its CUDA kernel searches the map as lowbit does.
    agree = (bs.absmax == ls.absmax).float().mean().item()
    assert agree > (0.9999 if device == "cuda" else 0.99), agree
    # Where the two disagree, lowbit's entry is never farther from the value
    # than bnb's: lowbit takes the nearest entry.
    _, plain = F.quantize_4bit(x, 64, "nf4", double_quant=False)
    scaled = (plain.absmax - ls.offset) / ls.nested_absmax.repeat_interleave(256)[: plain.absmax.numel()]
    code = ls.nested_code
    d_low = (code[ls.absmax.long()] - scaled).abs()
    d_bnb = (code[bs.absmax.long()] - scaled).abs()
    assert torch.all(d_low <= d_bnb + 1e-6)


def test_dynamic_map_equals_bnb():
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("bnb's table differs on CPUs without AVX2 (torch.linspace rounds differently there)")
    assert torch.equal(bnbF.create_dynamic_map(signed=True), F.get_dynamic_map(True))
    assert torch.equal(bnbF.create_dynamic_map(signed=False), F.get_dynamic_map(False))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_layout_equals_bnb(double_quant, quant_type):
    x = torch.randn(300, 64, dtype=torch.float16)
    lp, ls = F.quantize_4bit(x, 64, quant_type, double_quant=double_quant)
    ours = ls.to_state_dict("weight.")
    theirs = {"weight." + k: v for k, v in bnb_state(ls).as_dict(packed=True).items()}
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    meta = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert list(meta)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
