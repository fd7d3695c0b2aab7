"""fuse_rms_norms: torch's fused rms_norm in place of Llama-style RMSNorm forwards."""
import pytest
import torch
import torch.nn as nn

from lowbit.nn import fuse_rms_norms, unfuse_rms_norms

from conftest import devices

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402


def _pair(dtype, device):
    a = LlamaRMSNorm(96, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
    b = LlamaRMSNorm(96, eps=1e-5).to(device=device, dtype=dtype)
    b.load_state_dict(a.state_dict())
    assert fuse_rms_norms(b) == 1
    return a, b


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_equals_composite(device, dtype, tol):
    a, b = _pair(dtype, device)
    x = (torch.randn(3, 7, 96, device=device) * 3).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa), b(xb)
    assert yb.dtype == ya.dtype == dtype
    rel = lambda u, v: ((u.float() - v.float()).norm() / v.float().norm()).item()  # noqa: E731
    assert rel(yb, ya) < tol
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert rel(xb.grad, xa.grad) < 2 * tol
    assert rel(b.weight.grad, a.weight.grad) < 2 * tol


def test_mixed_dtypes_keep_the_composite_behaviour():
    a, b = _pair(torch.float32, "cpu")
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x)) and b(x).dtype == torch.float32  # float32 weight promotes


def test_selects_llama_norms_only_and_unfuses():
    model = nn.Sequential(LlamaRMSNorm(16), nn.LayerNorm(16), LlamaRMSNorm(16))
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    model.append(gemma.GemmaRMSNorm(16))  # x * (1 + weight): not the same formula, left alone
    assert fuse_rms_norms(model) == 2
    assert fuse_rms_norms(model) == 0  # already fused
    assert "forward" not in model[3].__dict__
    x = torch.randn(4, 16)
    fused = model(x)
    assert unfuse_rms_norms(model) == 2
    assert all("forward" not in m.__dict__ for m in model)
    assert torch.allclose(model(x), fused, rtol=1e-5, atol=1e-6)


def test_bad_argument():
    with pytest.raises(TypeError, match="fuse_rms_norms needs an nn.Module, got str"):
        fuse_rms_norms("model")
