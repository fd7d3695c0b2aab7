"""opcheck (schema, fake kernels, autograd registration, AOT dispatch) and
torch.compile over every quantize-family op."""
import pytest
import torch

from lowbit import functional as F
from lowbit import ops

from conftest import devices


def samples(device):
    x16 = torch.randn(37, 129, dtype=torch.bfloat16, device=device)
    x32 = torch.randn(1000, device=device)
    code4 = F.get_4bit_code("nf4", device)
    code8 = F.get_dynamic_map(True, device)
    packed, st = F.quantize_4bit(x16, 64, "nf4", double_quant=True)
    plain_am = st.dequantized_absmax()
    q8, am8 = ops.quantize_8bit_blockwise(x32, code8, 256)
    return [
        (torch.ops.lowbit.quantize_4bit.default, (x16, 64, "nf4")),
        (torch.ops.lowbit.quantize_4bit.default, (x32, 4096, "fp4")),
        (torch.ops.lowbit.dequantize_4bit.default, (packed, plain_am, code4, 64, [37, 129], torch.float16)),
        (torch.ops.lowbit.dequantize_4bit.default,
         (packed, st.absmax, code4, 64, [37, 129], torch.bfloat16, st.nested_absmax, st.nested_code, st.offset, 256)),
        (torch.ops.lowbit.quantize_8bit_blockwise.default, (x32, code8, 256)),
        (torch.ops.lowbit.dequantize_8bit_blockwise.default, (q8, am8, code8, 256, torch.float32)),
    ]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for op, args in samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    code4 = F.get_4bit_code("nf4", device)

    def roundtrip(x):
        packed, absmax = ops.quantize_4bit(x, 64, "nf4")
        return ops.dequantize_4bit(packed, absmax, code4, 64, x.shape, x.dtype)

    x = torch.randn(64, 96, device=device, dtype=torch.float16)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert torch.equal(compiled(x), roundtrip(x))
