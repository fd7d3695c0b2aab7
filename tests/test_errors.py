"""Bad input gives a clear error naming the argument, never a crash."""
import json

import pytest
import torch

from lowbit import functional as F
from lowbit import ops


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64, torch.complex64])
def test_quantize_rejects_non_float(dtype):
    w = torch.ones(64, dtype=dtype)
    with pytest.raises(ValueError, match="w must be float16, bfloat16 or float32"):
        F.quantize_4bit(w)
    with pytest.raises(ValueError, match=r"lowbit.quantize_4bit: argument 'A' must be float32, float16 or bfloat16"):
        ops.quantize_4bit(w, 64, "nf4")


def test_quantize_rejects_non_tensor():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        F.quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_bad_blocksize(blocksize):
    w = torch.randn(256)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        F.quantize_4bit(w, blocksize)
    with pytest.raises(ValueError, match=f"argument 'blocksize' must be one of .* got {blocksize}"):
        ops.quantize_4bit(w, blocksize, "nf4")


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        F.quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="argument 'quant_type' must be 'nf4' or 'fp4', got 'int4'"):
        ops.quantize_4bit(torch.randn(64), 64, "int4")


def test_dequantize_mismatches():
    w = torch.randn(100, 64)
    packed, st = F.quantize_4bit(w, double_quant=False)
    code = st.code
    with pytest.raises(ValueError, match=r"argument 'packed' must have 3200 elements, got 3199"):
        ops.dequantize_4bit(packed[:-1], st.absmax, code, 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match=r"argument 'absmax' must have 100 elements, got 99"):
        ops.dequantize_4bit(packed, st.absmax[:-1], code, 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match=r"argument 'absmax' must be float32 \(or uint8 with 'nested_absmax'\)"):
        ops.dequantize_4bit(packed, st.absmax.half(), code, 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match=r"argument 'packed' must have dtype Byte, got Char"):
        ops.dequantize_4bit(packed.view(torch.int8), st.absmax, code, 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match=r"argument 'code' must have 16 elements"):
        ops.dequantize_4bit(packed, st.absmax, torch.zeros(8), 64, [100, 64], torch.float32)
    with pytest.raises(ValueError, match=r"argument 'dtype' must be float32, float16 or bfloat16, got Int"):
        ops.dequantize_4bit(packed, st.absmax, code, 64, [100, 64], torch.int32)
    with pytest.raises(ValueError, match="need all of 'nested_absmax', 'nested_code' and 'offset'"):
        ops.dequantize_4bit(packed, st.absmax, code, 64, [100, 64], torch.float32, torch.ones(1))
    # the Python layer checks the state against the packed tensor
    with pytest.raises(ValueError, match="packed weight has 3199 bytes, but shape \\[100, 64\\] needs 3200"):
        F.dequantize_4bit(packed[:-1], st)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        F.dequantize_4bit(packed, {"absmax": st.absmax})


def test_8bit_mismatches():
    code = F.get_dynamic_map(True)
    with pytest.raises(ValueError, match="argument 'code' must have 256 elements"):
        ops.quantize_8bit_blockwise(torch.randn(10), code[:255], 256)
    q, am = ops.quantize_8bit_blockwise(torch.randn(1000), code, 256)
    with pytest.raises(ValueError, match="argument 'absmax' must have 4 elements, got 3"):
        ops.dequantize_8bit_blockwise(q, am[:3], code, 256, torch.float32)


def _state_dict():
    packed, st = F.quantize_4bit(torch.randn(64, 128))
    return st.to_state_dict("w."), st


@pytest.mark.parametrize("key", ["w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map"])
def test_state_dict_missing_key(key):
    sd, _ = _state_dict()
    del sd[key]
    with pytest.raises(KeyError, match=f"missing key '{key}'"):
        F.QuantState.from_state_dict(sd, "w.")


def test_state_dict_missing_quant_state():
    sd, _ = _state_dict()
    del sd["w.quant_state.bitsandbytes__nf4"]
    with pytest.raises(KeyError, match="expected exactly one key 'w.quant_state.bitsandbytes__nf4'"):
        F.QuantState.from_state_dict(sd, "w.")


@pytest.mark.parametrize(
    "blob,match",
    [
        (b"{not json", "does not hold valid UTF-8 JSON"),
        (b"\xff\xfe", "does not hold valid UTF-8 JSON"),
        (b"[1, 2]", "holds list, expected a JSON object"),
        (json.dumps({"blocksize": 64, "dtype": "float16"}).encode(), "lacks 'shape'"),
        (json.dumps({"blocksize": 48, "dtype": "float16", "shape": [64, 128]}).encode(), "blocksize in the quant state"),
        (json.dumps({"blocksize": 64, "dtype": "nonsense", "shape": [64, 128]}).encode(), "not a torch dtype name"),
        (json.dumps({"blocksize": 64, "dtype": "float16", "shape": [64, -1]}).encode(), "non-negative ints"),
        (json.dumps({"blocksize": 64, "dtype": "float16", "shape": [64, 100]}).encode(), "absmax has 128 entries"),
    ],
)
def test_state_dict_malformed_json(blob, match):
    sd, _ = _state_dict()
    sd = {k: v for k, v in sd.items() if "nested" not in k}
    sd["w.absmax"] = torch.rand(128)
    sd["w.quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        F.QuantState.from_state_dict(sd, "w.")


def test_state_dict_roundtrip_exact():
    sd, st = _state_dict()
    back = F.QuantState.from_state_dict(sd, "w.")
    for a, b in zip(st.quant_args(), back.quant_args()):
        assert (a == b) if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    assert back.shape == st.shape and back.dtype == st.dtype and back.quant_type == st.quant_type
