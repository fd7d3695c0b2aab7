"""Linear4bit with LoRA, model conversion, checkpoints and PEFT adapters."""
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lowbit
from lowbit import functional as F
from lowbit.nn import Linear4bit, quantize_model

from conftest import devices


def make_linear(k=96, n=80, bias=True, device="cpu"):
    lin = nn.Linear(k, n, bias=bias, device=device)
    with torch.no_grad():
        lin.bias.normal_() if bias else None
    return lin


def ref_forward(layer, x):
    """float32 reference: dequantized W, bias, and the LoRA branch without dropout."""
    w = F.dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
    out = x.float() @ w.t()
    if layer.bias is not None:
        out = out + layer.bias.float()
    if layer.lora_A is not None:
        out = out + layer.scaling * (x.float() @ layer.lora_A.float().t()) @ layer.lora_B.float().t()
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_fresh_layer_equals_base(device, compute_dtype):
    lin = make_linear(device=device)
    q = Linear4bit.from_linear(lin, r=8, lora_alpha=16, compute_dtype=compute_dtype)
    x = torch.randn(5, 7, 96, device=device, dtype=compute_dtype)
    out = q(x)
    assert out.shape == (5, 7, 80) and out.dtype == compute_dtype
    # B is zero: the adapters add exactly nothing to the base 4-bit matmul.
    base = F.matmul_4bit(x, q.weight, q.quant_state, q.bias.to(compute_dtype))
    assert torch.equal(out, base)
    tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
    ref = ref_forward(q, x)
    assert ((out.float() - ref).norm() / ref.norm()) < tol
    # and close to the unquantized layer (NF4 error ~0.1 of the weight's)
    full = lin(x.float())
    assert ((out.float() - full).norm() / full.norm()) < 0.15


@pytest.mark.parametrize("device", devices())
def test_backward_grads(device):
    q = Linear4bit.from_linear(make_linear(device=device), r=4, lora_alpha=8, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    q.bias.requires_grad_(True)
    x = torch.randn(6, 96, device=device, requires_grad=True)
    g = torch.randn(6, 80, device=device)
    q(x).backward(g)
    # reference with autograd in float64
    w = F.dequantize_4bit(q.weight, q.quant_state, torch.float32).double()
    A = q.lora_A.detach().double().requires_grad_(True)
    B = q.lora_B.detach().double().requires_grad_(True)
    b = q.bias.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = xr @ w.t() + b + q.scaling * (xr @ A.t()) @ B.t()
    out.backward(g.double())
    for got, want in ((x.grad, xr.grad), (q.lora_A.grad, A.grad), (q.lora_B.grad, B.grad), (q.bias.grad, b.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
    assert q.weight.grad is None and not q.weight.requires_grad


def test_dropout_only_in_training():
    q = Linear4bit.from_linear(make_linear(), r=4, lora_dropout=0.5, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(4, 96)
    q.eval()
    assert torch.equal(q(x), q(x))
    q.train()
    assert not torch.equal(q(x), q(x))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_node_matches_float64_with_its_dropout_mask(device, compute_dtype, p):
    """Training calls go through one autograd node (base, bias, LoRA and dropout
    together); its output and every gradient equal a float64 autograd reference
    built with the same dropout mask (drawn again from the same seed)."""
    torch.manual_seed(11)
    q = Linear4bit.from_linear(make_linear(k=96, n=80, device=device), r=4, lora_alpha=12, lora_dropout=p,
                               compute_dtype=compute_dtype)
    with torch.no_grad():
        q.lora_B.normal_()
    q.bias.requires_grad_(True)
    x = torch.randn(2, 5, 96, device=device, requires_grad=True)
    g = torch.randn(2, 5, 80, device=device)
    torch.manual_seed(12)
    out = q(x)
    node, names = out.grad_fn, []  # the output's view and cast, then the layer's one node
    while node is not None and len(names) < 3:
        names.append(type(node).__name__)
        node = node.next_functions[0][0]
    assert "Lora4bitFunctionBackward" in names, names
    out.backward(g)
    torch.manual_seed(12)  # the forward's first random draw is the dropout mask
    xc = x.detach().to(compute_dtype).reshape(-1, 96)
    mask = torch.native_dropout(xc, p, True)[1].double() / (1 - p) if p > 0 else torch.ones_like(xc).double()
    w = F.dequantize_4bit(q.weight, q.quant_state, torch.float32).double()
    A = q.lora_A.detach().double().requires_grad_(True)
    B = q.lora_B.detach().double().requires_grad_(True)
    b = q.bias.detach().double().requires_grad_(True)
    xr = x.detach().double().reshape(-1, 96).requires_grad_(True)
    ref = xr @ w.t() + b + q.scaling * ((xr * mask) @ A.t()) @ B.t()
    ref.backward(g.double().reshape(-1, 80))
    tol = 1e-4 if compute_dtype == torch.float32 else 3e-2
    def close(got, want):
        return ((got.double().reshape(want.shape) - want).norm() / want.norm()).item() < tol
    assert close(out, ref)
    for leaf, want in ((x, xr.grad), (q.lora_A, A.grad), (q.lora_B, B.grad), (q.bias, b.grad)):
        assert leaf.grad.dtype == leaf.dtype
        assert close(leaf.grad, want)


def test_training_and_inference_paths_agree():
    """The fused training node and the no-grad path compute the same output."""
    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(7, 96)
    train_out = q(x)
    assert train_out.grad_fn is not None
    with torch.no_grad():
        assert torch.allclose(q(x), train_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(use_reentrant):
    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(3, 96, requires_grad=True)
    q(x).sum().backward()
    want = q.lora_A.grad.clone(), q.lora_B.grad.clone(), x.grad.clone()
    q.zero_grad()
    x.grad = None
    checkpoint(q, x, use_reentrant=use_reentrant).sum().backward()
    for a, b in zip((q.lora_A.grad, q.lora_B.grad, x.grad), want):
        assert torch.equal(a, b)


def test_compile_fullgraph():
    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.float32)
    x = torch.randn(3, 96)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), q(x), atol=1e-6)


def test_autocast_input_dtype():
    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.float32  # returns the input's dtype; computes in bf16


@pytest.mark.parametrize("device", devices())
def test_merge(device):
    q = Linear4bit.from_linear(make_linear(device=device), r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    lin = q.merge(torch.float32)
    x = torch.randn(5, 96, device=device)
    assert torch.allclose(lin(x), q(x), rtol=1e-4, atol=1e-4)


def test_state_dict_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        q.lora_B.normal_()
    sd = q.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A", "lora_B"} == set(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    fresh = Linear4bit(96, 80, bias=True, r=4, compute_dtype=torch.float32)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(7, 96)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.weight, q.weight)


def test_load_state_dict_errors():
    q = Linear4bit.from_linear(make_linear(), r=0, compute_dtype=torch.float32)
    sd = q.state_dict()
    bad = dict(sd)
    del bad["weight.quant_map"]
    with pytest.raises(ValueError, match="missing key 'weight.quant_map'"):
        Linear4bit(96, 80).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"checkpoint weight has shape \[80, 96\], this layer is \[80, 64\]"):
        Linear4bit(64, 80).load_state_dict(sd)


def test_bad_input():
    q = Linear4bit.from_linear(make_linear(), r=2)
    with pytest.raises(ValueError, match=r"input's last dimension is 95, expected 96"):
        q(torch.randn(2, 95))
    with pytest.raises(ValueError, match="LoRA rank r must be a positive int"):
        Linear4bit.from_linear(make_linear(), r=-1)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(q_proj=nn.Linear(64, 64), v_proj=nn.Linear(64, 64), up=nn.Linear(64, 128)))
            for _ in range(2)
        )
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer["q_proj"](h) + layer["v_proj"](h)
        return self.lm_head(h)


def test_quantize_model_summary_and_freezing():
    m = Tiny()
    s = quantize_model(m, lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], compute_dtype=torch.float32,
                       progress=False)
    assert s.layers_converted == 4 and s.converted == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert isinstance(m.lm_head, nn.Linear) and isinstance(m.layers[0]["up"], nn.Linear)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{p}.lora_{ab}" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    assert s.trainable_params == 4 * (4 * 64 + 64 * 4)
    assert s.bytes_after < s.bytes_before / 3
    with pytest.raises(ValueError, match="no nn.Linear matched target_modules=\\['nothing'\\]"):
        quantize_model(Tiny(), target_modules=["nothing"], progress=False)


def test_adapter_roundtrip(tmp_path):
    m = Tiny()
    m2 = Tiny()
    m2.load_state_dict(m.state_dict())
    quantize_model(m, lora_r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    for mod in m.modules():
        if isinstance(mod, Linear4bit):
            with torch.no_grad():
                mod.lora_B.normal_()
    lowbit.save_adapter(m, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    quantize_model(m2, lora_r=4, lora_alpha=8, compute_dtype=torch.float32, progress=False)
    ids = torch.randint(0, 50, (2, 5))
    assert not torch.equal(m2(ids), m(ids))
    lowbit.load_adapter(m2, str(tmp_path))
    assert torch.equal(m2(ids), m(ids))


def test_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = Tiny()
    ref_base = Tiny()
    ref_base.load_state_dict(base.state_dict())
    quantize_model(base, lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], compute_dtype=torch.float32,
                   progress=False)
    for mod in base.modules():
        if isinstance(mod, Linear4bit):
            with torch.no_grad():
                mod.lora_B.normal_()
    lowbit.save_adapter(base, str(tmp_path))
    # PEFT on the 16-bit model whose linear weights are the dequantized 4-bit ones
    for name, mod in base.named_modules():
        if isinstance(mod, Linear4bit):
            target = ref_base.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(mod.dequantized_weight(torch.float32))
    pm = peft.PeftModel.from_pretrained(ref_base, str(tmp_path))
    ids = torch.randint(0, 50, (2, 5))
    assert torch.allclose(pm(ids), base(ids), rtol=1e-4, atol=1e-4)


def _train_lora(compute_dtype, steps=60):
    """Loss curve of a small QLoRA regression: a frozen 4-bit two-layer MLP whose
    adapters learn a fixed random target map."""
    from lowbit.optim import AdamW8bit

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    target = nn.Linear(64, 64)
    torch.manual_seed(1)
    quantize_model(base, lora_r=8, lora_alpha=16, target_modules=["0", "2"], skip_modules=(),
                   compute_dtype=compute_dtype, progress=False)
    opt = AdamW8bit([p for p in base.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        with torch.no_grad():
            y = target(x)
        loss = (base(x).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_bf16_compute_matches_fp32_adapters():
    """Adapters stored in float32 and used in bf16 (the default) train like
    adapters computed in float32 throughout."""
    bf16 = _train_lora(torch.bfloat16)
    fp32 = _train_lora(torch.float32)
    assert bf16[-10:].mean() < 0.8 * bf16[:5].mean()  # it learns
    rel = (bf16 - fp32).abs() / fp32
    assert rel.max() < 0.02, rel.max()  # measured: 0.2% over 60 steps


@pytest.mark.parametrize("field", ["absmax", "code", "nested_absmax", "nested_code", "offset"])
def test_training_node_refuses_a_gradient_for_the_4bit_weight(field):
    # absmax is float only without double quantization. A copy of the field
    # requires grad: the code tables are shared, cached tensors.
    q = Linear4bit.from_linear(make_linear(), r=4, compute_dtype=torch.float32, double_quant=field != "absmax")
    st = q.quant_state
    setattr(st, field, getattr(st, field).detach().clone().requires_grad_(True))
    out = q(torch.randn(3, 96, requires_grad=True))
    with pytest.raises(RuntimeError, match=rf"4-bit weight is frozen: no gradient flows to its '{field}'"):
        out.sum().backward()
