"""The 4-bit matmul ops (gemm_4bit and its backward gemm_4bit_t) against a
float32 reference: dequantize in float32, multiply in float64. The rule: the
op's error may be at most twice the error of "dequantize to x's dtype, then
torch matmul in that dtype", plus a tiny absolute floor."""
import pytest
import torch

from lowbit import functional as F
from lowbit import ops

from conftest import HAS_CUDA, devices, poison_allocator

GPU_MS = [1, 2, 3, 4, 5, 8, 16, 31, 64, 127, 512, 4096]
CPU_MS = [1, 5, 127]
# (N, K, blocksize): K % 256 == 0 takes the fused CUDA kernels, the rest the
# generic path; N odd or not a multiple of 16; every chunk width of the fused
# kernel (blocksize 32, 64, >= 128).
SHAPES = [
    (193, 768, 64),
    (96, 512, 32),
    (130, 1024, 128),
    (33, 2048, 1024),
    (77, 333, 64),
    (31, 256, 256),
    (50, 400, 32),
]
BIG_SHAPES = [(4096, 4096, 64), (1000, 11008, 64)]


def make_weight(N, K, blocksize, quant_type, double_quant, device):
    w = torch.randn(N, K, device=device) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return packed, state


def w_f32(packed, state):
    return F.dequantize_4bit(packed, state, torch.float32)


def check_close(out, ref64, base, what):
    """out and base (the dequantize-then-matmul baseline) against ref64."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten elements?)"
    err = (out.double() - ref64).norm().item()
    err_base = (base.double() - ref64).norm().item()
    floor = 1e-6 * ref64.norm().item() + 1e-30
    assert err <= 2 * err_base + floor, f"{what}: error {err:.3e} vs baseline {err_base:.3e}"


def forward_case(device, N, K, blocksize, quant_type, dq, dtype, Ms, bias=True, lead=()):
    packed, state = make_weight(N, K, blocksize, quant_type, dq, device)
    W32 = w_f32(packed, state)
    Wd = F.dequantize_4bit(packed, state, dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    for M in Ms:
        x = torch.randn(*lead, M, K, device=device).to(dtype)
        poison_allocator(device)
        out = F.matmul_4bit(x, packed, state, b)
        assert out.shape == (*lead, M, N) and out.dtype == dtype
        ref = x.double() @ W32.double().t()
        base = x @ Wd.t()
        if b is not None:
            ref = ref + b.double()
            base = base + b
        check_close(out, ref, base, f"M={M} N={N} K={K} bs={blocksize} {quant_type} dq={dq} {dtype}")


def _dtypes(device):
    return [torch.bfloat16, torch.float16, torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(device, quant_type, dq, shape):
    N, K, bs = shape
    Ms = CPU_MS if device == "cpu" else GPU_MS
    for dtype in _dtypes(device):
        forward_case(device, N, K, bs, quant_type, dq, dtype, Ms, bias=(N % 2 == 1))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_large_cuda(shape, dtype):
    N, K, bs = shape
    forward_case("cuda", N, K, bs, "nf4", True, dtype, [1, 4, 8, 32, 64, 128, 512], bias=True)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_forward_fp32_cuda():
    forward_case("cuda", 65, 512, 64, "nf4", True, torch.float32, [1, 4, 64], bias=True)


@pytest.mark.parametrize("device", devices())
def test_leading_dims_and_noncontiguous(device):
    dtype = torch.bfloat16
    forward_case(device, 48, 512, 64, "nf4", True, dtype, [3], lead=(2, 5))
    packed, state = make_weight(40, 256, 64, "nf4", False, device)
    x = torch.randn(256, 6, device=device).to(dtype).t()  # non-contiguous [6, 256]
    out = F.matmul_4bit(x, packed, state)
    base = x @ F.dequantize_4bit(packed, state, dtype).t()
    ref = x.double() @ w_f32(packed, state).double().t()
    check_close(out, ref, base, "non-contiguous x")


@pytest.mark.parametrize("device", devices())
def test_empty(device):
    packed, state = make_weight(16, 256, 64, "nf4", True, device)
    x = torch.randn(0, 256, device=device, dtype=torch.bfloat16)
    out = F.matmul_4bit(x, packed, state)
    assert out.shape == (0, 16)
    x = torch.randn(2, 0, 256, device=device, dtype=torch.bfloat16)
    assert F.matmul_4bit(x, packed, state).shape == (2, 0, 16)


def backward_case(device, N, K, blocksize, quant_type, dq, dtype, Ms):
    packed, state = make_weight(N, K, blocksize, quant_type, dq, device)
    W32 = w_f32(packed, state).double()
    Wd = F.dequantize_4bit(packed, state, dtype)
    for M in Ms:
        x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
        b = torch.randn(N, device=device).to(dtype).requires_grad_()
        out = F.matmul_4bit(x, packed, state, b)
        gout = torch.randn_like(out)
        poison_allocator(device)
        out.backward(gout)
        check_close(x.grad, gout.double() @ W32, gout @ Wd, f"grad_x M={M} N={N} K={K} {dtype} dq={dq}")
        torch.testing.assert_close(b.grad.float(), gout.float().sum(0), rtol=1e-2, atol=1e-2)
        # The op for the backward on its own, with leading dims.
        g = torch.randn(2, M, N, device=device).to(dtype)
        poison_allocator(device)
        got = ops.gemm_4bit_t(g, packed, *state.quant_args()[:3], N, K, *state.quant_args()[3:])
        assert got.shape == (2, M, K)
        check_close(got, g.double() @ W32, g @ Wd, f"gemm_4bit_t M={M} N={N} K={K} {dtype}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(193, 768, 64), (77, 333, 64), (96, 512, 32), (130, 1024, 256), (50, 400, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward(device, dq, shape):
    N, K, bs = shape
    Ms = [1, 5] if device == "cpu" else [1, 2, 3, 4, 5, 8, 16, 31, 64, 127, 512]
    for dtype in _dtypes(device):
        backward_case(device, N, K, bs, "nf4", dq, dtype, Ms)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_large_cuda(dtype):
    backward_case("cuda", 4096, 11008, 64, "fp4", True, dtype, [1, 4, 64, 4096])


def _op_args(device, dq, bias, dtype=torch.float32, M=3, N=24, K=256):
    packed, state = make_weight(N, K, 64, "nf4", dq, device)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(N, device=device, dtype=dtype, requires_grad=True) if bias else None
    return (x, packed, state.absmax, state.code, state.blocksize, N, K, state.nested_absmax, state.nested_code,
            state.offset, state.nested_blocksize, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(device, dq, bias):
    args = _op_args(device, dq, bias, torch.bfloat16 if device == "cuda" else torch.float32)
    torch.library.opcheck(torch.ops.lowbit.gemm_4bit.default, args)
    x, packed, absmax, code, bs, N, K, na, nc, off, nbs, _ = args
    g = torch.randn(3, N, device=device, dtype=x.dtype)
    torch.library.opcheck(torch.ops.lowbit.gemm_4bit_t.default, (g, packed, absmax, code, bs, N, K, na, nc, off, nbs))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    dtype = torch.bfloat16
    packed, state = make_weight(40, 512, 64, "nf4", True, device)
    b = torch.randn(40, device=device, dtype=dtype)

    def f(x):
        return torch.nn.functional.silu(F.matmul_4bit(x, packed, state, b)) * 2

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(5, 512, device=device, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = cf(x)
    want = f(x2)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("M", [1, 16, 64, 1024])
def test_cuda_graph_capture(M):
    dtype = torch.bfloat16
    packed, state = make_weight(256, 1024, 64, "nf4", True, "cuda")
    x = torch.randn(M, 1024, device="cuda", dtype=dtype)
    g = torch.randn(M, 256, device="cuda", dtype=dtype)

    def step():
        y = F.matmul_4bit(x, packed, state)
        gx = ops.gemm_4bit_t(g, packed, *state.quant_args()[:3], 256, 1024, *state.quant_args()[3:])
        return y, gx

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, gx = step()
    x.copy_(torch.randn_like(x))
    g.copy_(torch.randn_like(g))
    graph.replay()
    torch.cuda.synchronize()
    want_y, want_gx = step()
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_non_default_stream():
    dtype = torch.float16
    packed, state = make_weight(300, 1024, 64, "nf4", True, "cuda")
    x = torch.randn(4, 1024, device="cuda", dtype=dtype)
    want = F.matmul_4bit(x, packed, state)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            got = F.matmul_4bit(x, packed, state)
    s.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_errors(device):
    packed, state = make_weight(16, 256, 64, "nf4", True, device)
    x = torch.randn(2, 128, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="last dimension of 'x'"):
        F.matmul_4bit(x, packed, state)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        F.matmul_4bit(torch.ones(2, 256, device=device, dtype=torch.int32), packed, state)
    x = torch.randn(2, 256, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bias"):
        F.matmul_4bit(x, packed, state, torch.randn(15, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        F.matmul_4bit(x, packed, state, torch.randn(16, device=device, dtype=torch.float32))
    with pytest.raises(ValueError, match="last dimension of 'g'"):
        ops.gemm_4bit_t(x, packed, *state.quant_args()[:3], 16, 256, *state.quant_args()[3:])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_device_mismatch():
    packed, state = make_weight(16, 256, 64, "nf4", True, "cuda")
    with pytest.raises(ValueError, match="same device"):
        F.matmul_4bit(torch.randn(2, 256, dtype=torch.bfloat16), packed, state)


@pytest.mark.parametrize("device", devices())
def test_frozen_weight(device):
    packed, state = make_weight(16, 256, 64, "nf4", False, device)
    state.absmax.requires_grad_()
    x = torch.randn(2, 256, device=device, requires_grad=True)
    out = F.matmul_4bit(x, packed, state)
    with pytest.raises(RuntimeError, match="4-bit weight is frozen"):
        out.sum().backward()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dq", [False, True])
def test_matches_bitsandbytes(device, dq):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import QuantState as BnbState

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    N, K = 96, 512
    packed, state = make_weight(N, K, 64, "nf4", dq, device)
    state2 = None
    if dq:
        state2 = BnbState(absmax=state.nested_absmax, code=state.nested_code, blocksize=state.nested_blocksize,
                          dtype=torch.float32)
    qs = BnbState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                  quant_type="nf4", dtype=dtype, offset=state.offset, state2=state2)
    x = torch.randn(5, K, device=device, dtype=dtype)
    try:
        theirs = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
    except Exception as e:  # a bnb build without this device's backend
        pytest.skip(f"bitsandbytes matmul_4bit unavailable on {device}: {e}")
    ours = F.matmul_4bit(x, packed, state)
    ref = x.double() @ w_f32(packed, state).double().t()
    base = x @ F.dequantize_4bit(packed, state, dtype).t()
    check_close(ours, ref, base, "lowbit")
    check_close(theirs, ref, base, "bitsandbytes on the same state")
