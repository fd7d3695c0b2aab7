"""A matrix of bad inputs over the public API and the ops: each case must raise
the stated exception with a message naming the argument (or key, or file) at
fault; the inputs that are merely unusual (odd and prime sizes, K not a
multiple of the block, non-contiguous and zero-size tensors) must give the
reference result. Cases that tests/test_errors.py already covers are not
repeated here. Known gaps are strict xfails at the end of the file, each
saying what happens today; gaps since closed stay there as plain tests of the
error they now raise.

Kinds of bad input in the matrix (the case ids start with them):
  dtype      wrong element type of a tensor or parameter
  device     tensors on different devices (CUDA cases skip without a GPU)
  value      out-of-range scalars, unsupported block sizes and quant types
  shape      tensors that disagree with each other or with the stated shape
  nonfinite  NaN/Inf in weights and hyperparameters
  state      a QuantState or optimizer state that does not match its tensor
  keys       state dicts / checkpoints with missing, extra or mis-shaped keys
  file       missing, truncated or corrupted files

Counts (CPU; the 7 CUDA device cases skip without a GPU): 153 raising cases
(dtype 25, device 9, value 34, shape 14, nonfinite 10, state 9, keys 47,
file 5), 15 corrupted-file cases, 70 valid-but-unusual cases against a
reference; the 21 gaps once recorded as strict xfails are all closed.
"""
import dataclasses
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import Linear4bit, functional as F, ops
from lowbit.optim import AdamW8bit, PagedAdamW8bit

import reference as ref
from conftest import HAS_CUDA

SIGNED = F.get_dynamic_map(True, "cpu")
UNSIGNED = F.get_dynamic_map(False, "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# ---------------------------------------------------------------- builders (fresh tensors per case)


def w4(n=64, k=128, dq=True, device="cpu", **kw):
    return F.quantize_4bit(torch.randn(n, k, device=device), double_quant=dq, **kw)


def dq4(packed=None, absmax=None, code=None, blocksize=64, shape=(64, 128), dtype=torch.float32, nested=False,
        **nested_kw):
    """ops.dequantize_4bit with one argument replaced."""
    p, st = w4(dq=nested)
    args = dict(nested_absmax=st.nested_absmax, nested_code=st.nested_code, offset=st.offset) if nested else {}
    args.update(nested_kw)
    return ops.dequantize_4bit(p if packed is None else packed, st.absmax if absmax is None else absmax,
                               st.code if code is None else code, blocksize, list(shape), dtype, **args)


def gemm(x=None, packed=None, absmax=None, blocksize=64, N=64, K=128):
    p, st = w4(dq=False)
    x = torch.randn(3, 128) if x is None else x
    return ops.gemm_4bit(x, p if packed is None else packed, st.absmax if absmax is None else absmax, st.code,
                         blocksize, N, K)


def adam(n=5000, **change):
    p, g = torch.randn(n), torch.randn(n)
    nb = -(-n // 256)
    args = dict(params=[p], grads=[g], state1=[torch.zeros(n, dtype=torch.uint8)],
                state2=[torch.zeros(n, dtype=torch.uint8)], absmax1=[torch.zeros(nb)], absmax2=[torch.zeros(nb)],
                steps=[torch.ones(())], lr=torch.tensor(1e-3), code1=SIGNED, code2=UNSIGNED, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0)
    args.update(change)
    return ops.adamw8bit_step(**args)


def layer(r=4, dq=True):
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(128, 64), r=r, compute_dtype=torch.float32, double_quant=dq)


def load_layer(edit):
    sd = {k: v.clone() for k, v in layer().state_dict().items()}
    edit(sd)
    Linear4bit(128, 64, r=4, compute_dtype=torch.float32).load_state_dict(sd)


def with_weight(lin: nn.Linear, value):
    with torch.no_grad():
        lin.weight[3, 5] = value
    return lin


def model(dtype=torch.float32, device=None):
    return nn.Sequential(nn.Linear(64, 32, dtype=dtype, device=device), nn.ReLU(),
                         nn.Linear(32, 16, dtype=dtype, device=device))


def quantize(m, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("skip_modules", ())
    return lowbit.quantize_model(m, **kw)


def optimizer_state(n=10000):
    p = nn.Parameter(torch.randn(n))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def load_optimizer(edit, n=10000):
    sd = optimizer_state(n)
    edit(sd)
    AdamW8bit([nn.Parameter(torch.randn(n))]).load_state_dict(sd)


def set_state(key, value):
    return lambda sd: sd["state"][0].__setitem__(key, value(sd["state"][0][key]) if callable(value) else value)


def step_with(param, grad):
    opt = AdamW8bit([param])
    param.grad = grad
    opt.step()


def from_sd(edit, meta_edit=None):
    _, st = w4()
    sd = st.to_state_dict("w.")
    if meta_edit is not None:
        key = "w.quant_state.bitsandbytes__nf4"
        meta = json.loads(bytes(sd[key].numpy()).decode())
        meta_edit(meta)
        sd[key] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    edit(sd)
    return F.QuantState.from_state_dict(sd, "w.")


# adapters and checkpoints on disk

ADAPTER_W = "adapter_model.safetensors"
ADAPTER_CFG = "adapter_config.json"


def adapter_dir(tmp):
    torch.manual_seed(0)
    m = model()
    quantize(m, lora_r=4, compute_dtype=torch.float32)
    d = str(tmp / "adapter")
    lowbit.save_adapter(m, d)
    return d


def load_adapter_after(tmp, edit_tensors=None, edit_config=None, edit_files=None, target=None):
    from safetensors.torch import load_file, save_file

    d = adapter_dir(tmp)
    wp, cp = os.path.join(d, ADAPTER_W), os.path.join(d, ADAPTER_CFG)
    if edit_tensors is not None:
        t = load_file(wp)
        edit_tensors(t)
        save_file(t, wp)
    if edit_config is not None:
        with open(cp) as f:
            c = json.load(f)
        edit_config(c)
        with open(cp, "w") as f:
            json.dump(c, f)
    if edit_files is not None:
        edit_files(wp, cp)
    if target is None:
        target = model()
        quantize(target, lora_r=4, compute_dtype=torch.float32)
    return lowbit.load_adapter(target, d)


def quant_dir(tmp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    lowbit.quantize_model(net, lora_r=0, skip_modules=("2",), progress=False)
    d = str(tmp / "quant")
    lowbit.save_quantized(net, d)
    return d


def skeleton(hidden=96):
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 32))


def load_quantized_after(tmp, edit_tensors=None, edit_file=None, skel=None, device="cpu"):
    from safetensors.torch import load_file, save_file

    d = quant_dir(tmp)
    wp = os.path.join(d, "model.safetensors")
    if edit_tensors is not None:
        t = load_file(wp)
        edit_tensors(t)
        save_file(t, wp, metadata={"format": "pt"})
    if edit_file is not None:
        edit_file(wp)
    return lowbit.load_quantized(d, device=device, model=skel or skeleton(), progress=False)


def truncate(fraction=None, keep=None):
    """Cuts the file to a fraction of its length, or to `keep` bytes (negative: drop that many)."""

    def edit(path, *_):
        with open(path, "rb") as f:
            data = f.read()
        n = int(len(data) * fraction) if fraction is not None else (keep if keep >= 0 else len(data) + keep)
        with open(path, "wb") as f:
            f.write(data[:n])

    return edit


def flip_header_bytes(path, *_):
    """Inverts two bytes inside the JSON header (after the 8-byte length)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[10] ^= 0xFF
    data[20] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def huge_header_length(path, *_):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[0:8] = (1 << 40).to_bytes(8, "little")
    with open(path, "wb") as f:
        f.write(bytes(data))


def edit_header(fn):
    """Rewrites the safetensors JSON header (same data bytes)."""

    def edit(path, *_):
        with open(path, "rb") as f:
            data = f.read()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        fn(header)
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(path, "wb") as f:
            f.write(len(hb).to_bytes(8, "little") + hb + data[8 + n:])

    return edit


def fill_data(byte):
    def edit(path, *_):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        n = int.from_bytes(data[:8], "little")
        data[8 + n:] = bytes([byte]) * (len(data) - 8 - n)
        with open(path, "wb") as f:
            f.write(bytes(data))

    return edit


# ---------------------------------------------------------------- the matrix


def C(cid, fn, exc, match, *marks):
    """One case: fn(tmp_path) must raise exc with a message matching `match`."""
    return pytest.param(fn, exc, match, id=cid, marks=list(marks))


CASES = [
    # ---- functional.quantize_4bit / ops.quantize_4bit
    C("value-quantize_4bit-blocksize-str", lambda t: F.quantize_4bit(torch.randn(64), "64"), ValueError,
      r"blocksize must be one of .* got '64'"),
    C("value-quantize_4bit-blocksize-bool", lambda t: F.quantize_4bit(torch.randn(64), True), ValueError,
      r"blocksize must be one of .* got True"),
    C("value-quantize_4bit-quant_type-None", lambda t: F.quantize_4bit(torch.randn(64), 64, None), ValueError,
      r"quant_type must be one of .* got None"),
    C("value-quantize_4bit-fp4-upper", lambda t: F.quantize_4bit(torch.randn(64), quant_type="NF4"), ValueError,
      r"quant_type must be one of .* got 'NF4'"),
    C("nonfinite-quantize_4bit-inf-fp32", lambda t: F.quantize_4bit(torch.randn(100, 64).index_fill_(0, torch.tensor([7]), float("inf"))),
      ValueError, r"w holds NaN or Inf: 1 block\(s\) .* block 7 "),
    C("nonfinite-quantize_4bit-neginf-bf16", lambda t: F.quantize_4bit(
        torch.randn(4099, dtype=torch.bfloat16).index_fill_(0, torch.tensor([4098]), float("-inf")), 4096),
      ValueError, r"w holds NaN or Inf: 1 block\(s\) of 4096 .* block 1 "),
    C("nonfinite-quantize_4bit-nan-fp16-prime", lambda t: F.quantize_4bit(
        torch.randn(13, 97, dtype=torch.float16).index_fill_(1, torch.tensor([96]), float("nan")), 32),
      ValueError, r"w holds NaN or Inf"),
    # ---- ops.dequantize_4bit
    C("value-dequantize_4bit-blocksize-48", lambda t: dq4(blocksize=48), ValueError,
      r"argument 'blocksize' must be one of .* got 48"),
    C("value-dequantize_4bit-blocksize-mismatch", lambda t: dq4(blocksize=128), ValueError,
      r"argument 'absmax' must have 64 elements, got 128"),
    C("value-dequantize_4bit-nested_blocksize-48", lambda t: dq4(nested=True, nested_blocksize=48), ValueError,
      r"argument 'nested_blocksize' must be one of .* got 48"),
    C("shape-dequantize_4bit-negative", lambda t: dq4(shape=(-64, -128)), ValueError,
      r"argument 'shape' has a negative size"),
    C("shape-dequantize_4bit-other-shape", lambda t: dq4(shape=(32, 128)), ValueError,
      r"argument 'packed' must have 2048 elements, got 4096"),
    C("dtype-dequantize_4bit-code-f64", lambda t: dq4(code=F.get_4bit_code("nf4").double()), ValueError,
      r"argument 'code' must have dtype Float, got Double"),
    C("dtype-dequantize_4bit-absmax-f32-with-nested", lambda t: dq4(nested=True, absmax=torch.rand(128)), ValueError,
      r"'absmax' holds 8-bit codes and must be uint8, got Float"),
    C("dtype-dequantize_4bit-nested_absmax-f16", lambda t: dq4(nested=True, nested_absmax=torch.ones(1).half()),
      ValueError, r"argument 'nested_absmax' must have dtype Float, got Half"),
    C("shape-dequantize_4bit-nested_code-255", lambda t: dq4(nested=True, nested_code=SIGNED[:255]), ValueError,
      r"argument 'nested_code' must have 256 elements, got 255"),
    C("shape-dequantize_4bit-nested_absmax-2", lambda t: dq4(nested=True, nested_absmax=torch.ones(2)), ValueError,
      r"argument 'nested_absmax' must have 1 elements, got 2"),
    C("shape-dequantize_4bit-offset-2", lambda t: dq4(nested=True, offset=torch.zeros(2)), ValueError,
      r"argument 'offset' must have 1 elements, got 2"),
    # ---- functional.dequantize_4bit: the QuantState against its tensor
    C("state-dequantize_4bit-other-weight", lambda t: F.dequantize_4bit(w4()[0], w4(32, 128)[1]), ValueError,
      r"packed weight has 4096 bytes, but shape \[32, 128\] needs 2048"),
    C("state-dequantize_4bit-absmax-f16", lambda t: F.dequantize_4bit(
        w4(dq=False)[0], dataclasses.replace(w4(dq=False)[1], absmax=torch.ones(128).half())), ValueError,
      r"absmax must be torch.float32 here, got torch.float16"),
    C("state-dequantize_4bit-absmax-count", lambda t: F.dequantize_4bit(
        w4(dq=False)[0], dataclasses.replace(w4(dq=False)[1], absmax=torch.ones(127))), ValueError,
      r"absmax has 127 entries, but shape \[64, 128\] at blocksize 64 needs 128"),
    C("state-dequantize_4bit-blocksize", lambda t: F.dequantize_4bit(
        w4(dq=False)[0], dataclasses.replace(w4(dq=False)[1], blocksize=32)), ValueError,
      r"absmax has 128 entries, but shape \[64, 128\] at blocksize 32 needs 256"),
    C("state-dequantize_4bit-nested_absmax-count", lambda t: F.dequantize_4bit(
        w4()[0], dataclasses.replace(w4()[1], nested_absmax=torch.ones(3))), ValueError,
      r"nested_absmax has 3 entries, expected 1"),
    C("state-dequantize_4bit-packed-int8", lambda t: F.dequantize_4bit(w4()[0].view(torch.int8), w4()[1]), ValueError,
      r"packed weight must be uint8, got torch.int8"),
    C("dtype-dequantize_4bit-out-int32", lambda t: F.dequantize_4bit(*w4(), torch.int32), ValueError,
      r"argument 'dtype' must be float32, float16 or bfloat16, got Int"),
    # ---- 8-bit blockwise
    C("dtype-quantize_8bit-A-int32", lambda t: ops.quantize_8bit_blockwise(torch.ones(10, dtype=torch.int32), SIGNED, 256),
      ValueError, r"argument 'A' must be float32, float16 or bfloat16, got Int"),
    C("dtype-quantize_8bit-A-f64", lambda t: ops.quantize_8bit_blockwise(torch.ones(10).double(), SIGNED, 256),
      ValueError, r"argument 'A' must be float32, float16 or bfloat16, got Double"),
    C("dtype-quantize_8bit-code-f64", lambda t: ops.quantize_8bit_blockwise(torch.randn(10), SIGNED.double(), 256),
      ValueError, r"argument 'code' must have dtype Float, got Double"),
    C("value-quantize_8bit-blocksize-100", lambda t: ops.quantize_8bit_blockwise(torch.randn(10), SIGNED, 100),
      ValueError, r"argument 'blocksize' must be one of .* got 100"),
    C("value-quantize_blockwise-blocksize-100", lambda t: F.quantize_blockwise(torch.randn(10), blocksize=100),
      ValueError, r"blocksize must be one of .* got 100"),
    C("dtype-quantize_blockwise-A-int", lambda t: F.quantize_blockwise(torch.ones(10, dtype=torch.int64)),
      ValueError, r"A must be float16, bfloat16 or float32, got torch.int64"),
    C("dtype-dequantize_8bit-A-int8", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.int8), torch.ones(4), SIGNED, 256, torch.float32), ValueError,
      r"argument 'A' must have dtype Byte, got Char"),
    C("dtype-dequantize_8bit-absmax-f16", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.uint8), torch.ones(4).half(), SIGNED, 256, torch.float32), ValueError,
      r"argument 'absmax' must have dtype Float, got Half"),
    C("dtype-dequantize_8bit-out-int32", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.uint8), torch.ones(4), SIGNED, 256, torch.int32), ValueError,
      r"argument 'dtype' must be float32, float16 or bfloat16, got Int"),
    C("value-dequantize_8bit-blocksize-100", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.uint8), torch.ones(4), SIGNED, 100, torch.float32), ValueError,
      r"argument 'blocksize' must be one of .* got 100"),
    C("value-dequantize_8bit-blocksize-mismatch", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.uint8), torch.ones(4), SIGNED, 128, torch.float32), ValueError,
      r"argument 'absmax' must have 8 elements, got 4"),
    # ---- gemm_4bit / gemm_4bit_t / matmul_4bit
    C("dtype-gemm_4bit-x-f64", lambda t: gemm(x=torch.randn(3, 128).double()), ValueError,
      r"argument 'x' must be float32, float16 or bfloat16, got Double"),
    C("dtype-gemm_4bit-x-int", lambda t: gemm(x=torch.ones(3, 128, dtype=torch.int64)), ValueError,
      r"argument 'x' must be float32, float16 or bfloat16, got Long"),
    C("dtype-gemm_4bit-absmax-f16", lambda t: gemm(absmax=torch.ones(128).half()), ValueError,
      r"argument 'absmax' must be float32 \(or uint8 with 'nested_absmax'\), got Half"),
    C("shape-gemm_4bit-packed-short", lambda t: gemm(packed=torch.zeros(4095, 1, dtype=torch.uint8)), ValueError,
      r"argument 'packed' must have 4096 elements, got 4095"),
    C("shape-gemm_4bit-N-mismatch", lambda t: gemm(N=65), ValueError,
      r"argument 'packed' must have 4160 elements, got 4096"),
    C("shape-gemm_4bit-N-negative", lambda t: gemm(N=-64), ValueError,
      r"the weight shape \[N, K\] must be non-negative, got \[-64, 128\]"),
    C("shape-gemm_4bit-K-mismatch-3d", lambda t: gemm(x=torch.randn(2, 3, 127)), ValueError,
      r"last dimension of 'x'"),
    C("value-gemm_4bit-blocksize-48", lambda t: gemm(blocksize=48), ValueError,
      r"argument 'blocksize' must be one of .* got 48"),
    C("dtype-gemm_4bit_t-g-f64", lambda t: ops.gemm_4bit_t(torch.randn(3, 64).double(), *w4(dq=False)[:1],
                                                          *w4(dq=False)[1].quant_args()[:3], 64, 128), ValueError,
      r"argument 'g' must be float32, float16 or bfloat16, got Double"),
    C("state-matmul_4bit-1d-state", lambda t: F.matmul_4bit(torch.randn(2, 128), *F.quantize_4bit(torch.randn(128))),
      ValueError, r"matmul_4bit needs a 2-D weight \[out_features, in_features\], got shape \[128\]"),
    C("state-matmul_4bit-not-a-state", lambda t: F.matmul_4bit(torch.randn(2, 128), w4()[0], {"absmax": None}),
      TypeError, r"state must be a QuantState, got dict"),
    C("state-matmul_4bit-other-weight", lambda t: F.matmul_4bit(torch.randn(2, 128), w4()[0], w4(32, 128)[1]),
      ValueError, r"argument 'packed' must have 2048 elements, got 4096"),
    # ---- adamw8bit_step
    C("dtype-adamw8bit-params-f64", lambda t: adam(params=[torch.randn(5000).double()]), ValueError,
      r"argument 'params\[0\]' must be float32, float16 or bfloat16, got Double"),
    C("dtype-adamw8bit-grads-bf16", lambda t: adam(grads=[torch.randn(5000).bfloat16()]), ValueError,
      r"argument 'grads\[0\]' must have dtype Float, got BFloat16"),
    C("dtype-adamw8bit-lr-int", lambda t: adam(lr=torch.tensor(1)), ValueError,
      r"argument 'lr' must have dtype Float, got Long"),
    C("dtype-adamw8bit-code2-f64", lambda t: adam(code2=UNSIGNED.double()), ValueError,
      r"argument 'code2' must have dtype Float, got Double"),
    C("dtype-adamw8bit-absmax2-f16", lambda t: adam(absmax2=[torch.zeros(20).half()]), ValueError,
      r"argument 'absmax2\[0\]' must have dtype Float, got Half"),
    C("shape-adamw8bit-steps-2", lambda t: adam(steps=[torch.ones(2)]), ValueError,
      r"argument 'steps\[0\]' must have 1 elements, got 2"),
    C("shape-adamw8bit-steps-missing", lambda t: adam(steps=[]), ValueError,
      r"argument 'steps' has 0 tensors but 'params' has 1"),
    C("shape-adamw8bit-state1-noncontiguous", lambda t: adam(state1=[torch.zeros(10000, dtype=torch.uint8)[::2]]),
      ValueError, r"argument 'state1\[0\]' must be contiguous"),
    C("value-adamw8bit-weight_decay-neg", lambda t: adam(weight_decay=-1.0), ValueError,
      r"argument 'weight_decay' must be >= 0"),
    C("nonfinite-adamw8bit-beta2-nan", lambda t: adam(beta2=float("nan")), ValueError,
      r"argument 'beta2' must be in \[0, 1\), got nan"),
    C("nonfinite-adamw8bit-eps-nan", lambda t: adam(eps=float("nan")), ValueError, r"argument 'eps' must be >= 0"),
    # ---- Linear4bit
    C("shape-Linear4bit-forward-3d-K", lambda t: layer()(torch.randn(2, 3, 127)), ValueError,
      r"input's last dimension is 127, expected 128"),
    C("value-Linear4bit-in_features-0", lambda t: Linear4bit(0, 5), ValueError,
      r"in_features and out_features must be positive, got 0, 5"),
    C("value-Linear4bit-blocksize-48", lambda t: Linear4bit(64, 5, blocksize=48), ValueError,
      r"blocksize must be one of .* got 48"),
    C("value-Linear4bit-quant_type", lambda t: Linear4bit(64, 5, quant_type="int4"), ValueError,
      r"quant_type must be one of .* got 'int4'"),
    C("dtype-Linear4bit-compute_dtype-int8", lambda t: Linear4bit(64, 5, compute_dtype=torch.int8), ValueError,
      r"compute_dtype must be float16, bfloat16 or float32, got torch.int8"),
    C("nonfinite-from_linear-nan", lambda t: Linear4bit.from_linear(with_weight(nn.Linear(64, 8), float("nan"))),
      ValueError, r"from_linear: w holds NaN or Inf"),
    C("nonfinite-from_linear-inf", lambda t: Linear4bit.from_linear(with_weight(nn.Linear(64, 8), float("inf"))),
      ValueError, r"from_linear: w holds NaN or Inf"),
    C("device-from_linear-meta", lambda t: Linear4bit.from_linear(nn.Linear(64, 8, device="meta")), ValueError,
      r"from_linear: the layer's weight is on the meta device"),
    C("dtype-from_linear-f64", lambda t: Linear4bit.from_linear(nn.Linear(64, 8).double()), ValueError,
      r"from_linear: w must be float16, bfloat16 or float32, got torch.float64"),
    C("value-add_lora-float-rank", lambda t: Linear4bit(64, 8).add_lora(2.0), ValueError,
      r"LoRA rank r must be a positive int, got 2.0"),
    C("value-add_lora-dropout-1", lambda t: Linear4bit(64, 8).add_lora(2, lora_dropout=1.0), ValueError,
      r"lora_dropout must be in \[0, 1\), got 1.0"),
    C("keys-Linear4bit-load-missing-weight", lambda t: load_layer(lambda sd: sd.pop("weight")), RuntimeError,
      r"Missing key\(s\) in state_dict: \"weight\""),
    C("keys-Linear4bit-load-missing-lora_A", lambda t: load_layer(lambda sd: sd.pop("lora_A")), RuntimeError,
      r"Missing key\(s\) in state_dict: \"lora_A\""),
    C("keys-Linear4bit-load-extra", lambda t: load_layer(lambda sd: sd.__setitem__("lora_C", torch.zeros(1))),
      RuntimeError, r"Unexpected key\(s\) in state_dict: \"lora_C\""),
    C("keys-Linear4bit-load-lora_A-misshaped", lambda t: load_layer(lambda sd: sd.__setitem__("lora_A", torch.zeros(4, 127))),
      RuntimeError, r"size mismatch for lora_A"),
    C("keys-Linear4bit-load-bias-misshaped", lambda t: load_layer(lambda sd: sd.__setitem__("bias", torch.zeros(63))),
      RuntimeError, r"size mismatch for bias"),
    C("keys-Linear4bit-load-absmax-short", lambda t: load_layer(lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"][:-1])),
      ValueError, r"absmax has 127 entries, but shape \[64, 128\] at blocksize 64 needs 128"),
    C("keys-Linear4bit-load-absmax-f32-nested", lambda t: load_layer(lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"].float())),
      ValueError, r"absmax must be torch.uint8 here, got torch.float32"),
    C("keys-Linear4bit-load-packed-short", lambda t: load_layer(lambda sd: sd.__setitem__("weight", sd["weight"][:-1])),
      ValueError, r"packed weight has 4095 bytes, but shape \[64, 128\] needs 4096"),
    C("keys-Linear4bit-load-packed-f16", lambda t: load_layer(lambda sd: sd.__setitem__("weight", sd["weight"].half())),
      ValueError, r"packed weight must be uint8, got torch.float16"),
    C("keys-Linear4bit-load-nested_absmax-long", lambda t: load_layer(lambda sd: sd.__setitem__("weight.nested_absmax", torch.ones(5))),
      ValueError, r"nested_absmax has 5 entries, expected 1"),
    C("keys-Linear4bit-load-quant_map-15", lambda t: load_layer(lambda sd: sd.__setitem__("weight.quant_map", sd["weight.quant_map"][:15])),
      ValueError, r"quant_map must be 16 float32 values, got 15"),
    C("keys-Linear4bit-load-quant_map-f64", lambda t: load_layer(lambda sd: sd.__setitem__("weight.quant_map", sd["weight.quant_map"].double())),
      ValueError, r"quant_map must be 16 float32 values, got 16 torch.float64"),
    C("keys-Linear4bit-load-nested_quant_map-255", lambda t: load_layer(
        lambda sd: sd.__setitem__("weight.nested_quant_map", sd["weight.nested_quant_map"][:255])),
      ValueError, r"nested_quant_map must have 256 entries, got 255"),
    C("keys-Linear4bit-load-other-shape", lambda t: Linear4bit(128, 32).load_state_dict(layer(r=0).state_dict()),
      ValueError, r"checkpoint weight has shape \[64, 128\], this layer is \[32, 128\]"),
    # ---- QuantState.from_state_dict (beyond tests/test_errors.py)
    C("keys-from_state_dict-two-quant-states", lambda t: from_sd(
        lambda sd: sd.__setitem__("w.quant_state.bitsandbytes__fp4", sd["w.quant_state.bitsandbytes__nf4"])),
      KeyError, r"expected exactly one key .* found \['w.quant_state.bitsandbytes__nf4', 'w.quant_state.bitsandbytes__fp4'\]"),
    C("keys-from_state_dict-quant_type-int4", lambda t: from_sd(
        lambda sd: sd.__setitem__("w.quant_state.bitsandbytes__int4", sd.pop("w.quant_state.bitsandbytes__nf4"))),
      ValueError, r"key says 'int4' but JSON says 'nf4'"),
    C("keys-from_state_dict-json-fp4", lambda t: from_sd(lambda sd: None, lambda m: m.__setitem__("quant_type", "fp4")),
      ValueError, r"key says 'nf4' but JSON says 'fp4'"),
    C("keys-from_state_dict-no-nested_offset", lambda t: from_sd(lambda sd: None, lambda m: m.pop("nested_offset")),
      ValueError, r"double-quantized state lacks 'nested_offset'"),
    C("keys-from_state_dict-no-nested_blocksize", lambda t: from_sd(lambda sd: None, lambda m: m.pop("nested_blocksize")),
      ValueError, r"double-quantized state lacks 'nested_blocksize'"),
    C("value-from_state_dict-nested_blocksize-48", lambda t: from_sd(lambda sd: None, lambda m: m.__setitem__("nested_blocksize", 48)),
      ValueError, r"nested_blocksize in the quant state must be one of .* got 48"),
    C("value-from_state_dict-blocksize-float", lambda t: from_sd(lambda sd: None, lambda m: m.__setitem__("blocksize", 64.0)),
      ValueError, r"blocksize in the quant state must be one of .* got 64.0"),
    C("keys-from_state_dict-shape-str", lambda t: from_sd(lambda sd: None, lambda m: m.__setitem__("shape", "64x128")),
      ValueError, r"shape must be a list of non-negative ints, got '64x128'"),
    C("keys-from_state_dict-nested_absmax-missing", lambda t: from_sd(lambda sd: sd.pop("w.nested_absmax")),
      KeyError, r"missing key 'w.nested_absmax'"),
    C("keys-from_state_dict-absmax-count", lambda t: from_sd(lambda sd: sd.__setitem__("w.absmax", sd["w.absmax"][:100])),
      ValueError, r"absmax has 100 entries, but shape \[64, 128\] at blocksize 64 needs 128"),
    C("keys-from_state_dict-nested_quant_map-count", lambda t: from_sd(
        lambda sd: sd.__setitem__("w.nested_quant_map", sd["w.nested_quant_map"][:128])),
      ValueError, r"nested_quant_map must have 256 entries, got 128"),
    # ---- quantize_model
    C("value-quantize_model-no-linear", lambda t: quantize(nn.Sequential(nn.ReLU())), ValueError,
      r"quantize_model: no nn.Linear matched target_modules=None"),
    C("value-quantize_model-lora_r-neg", lambda t: quantize(model(), lora_r=-1), ValueError, r"lora_r must be >= 0, got -1"),
    C("value-quantize_model-lora_r-float", lambda t: quantize(model(), lora_r=2.5), ValueError,
      r"LoRA rank r must be a positive int, got 2.5"),
    C("value-quantize_model-blocksize-48", lambda t: quantize(model(), blocksize=48), ValueError,
      r"blocksize must be one of .* got 48"),
    C("value-quantize_model-quant_type", lambda t: quantize(model(), quant_type="int4"), ValueError,
      r"quant_type must be one of .* got 'int4'"),
    C("value-quantize_model-lora_dropout", lambda t: quantize(model(), lora_dropout=1.5), ValueError,
      r"lora_dropout must be in \[0, 1\), got 1.5"),
    C("dtype-quantize_model-compute_dtype", lambda t: quantize(model(), compute_dtype=torch.int8), ValueError,
      r"compute_dtype must be float16, bfloat16 or float32, got torch.int8"),
    C("dtype-quantize_model-f64-model", lambda t: quantize(model(torch.float64)), ValueError,
      r"w must be float16, bfloat16 or float32, got torch.float64"),
    C("nonfinite-quantize_model-inf-weight", lambda t: quantize(nn.Sequential(with_weight(nn.Linear(64, 8), float("inf")))),
      ValueError, r"w holds NaN or Inf"),
    C("device-quantize_model-meta", lambda t: quantize(model(device="meta")), ValueError, r"on the meta device"),
    C("value-quantize_model-target-no-match", lambda t: quantize(model(), target_modules=["q_proj"]), ValueError,
      r"no nn.Linear matched target_modules=\['q_proj'\]"),
    # ---- save_adapter / load_adapter
    C("value-save_adapter-no-lora", lambda t: lowbit.save_adapter(model(), str(t)), ValueError,
      r"save_adapter: the model has no Linear4bit layers with LoRA adapters"),
    C("file-load_adapter-missing-dir", lambda t: lowbit.load_adapter(model(), str(t / "nowhere")), FileNotFoundError,
      r"nowhere.*adapter_model.safetensors does not exist"),
    C("file-load_adapter-missing-config", lambda t: load_adapter_after(t, edit_files=lambda wp, cp: os.unlink(cp)),
      FileNotFoundError, r"adapter_config.json does not exist"),
    C("keys-load_adapter-missing-lora_B", lambda t: load_adapter_after(t, edit_tensors=lambda d: d.pop("base_model.model.0.lora_B.weight")),
      ValueError, r"layer '0' has only \['lora_A'\]"),
    C("keys-load_adapter-extra-layer", lambda t: load_adapter_after(
        t, edit_tensors=lambda d: d.__setitem__("base_model.model.9.lora_A.weight", torch.zeros(4, 64))),
      ValueError, r"no Linear4bit named \['9'\]"),
    C("keys-load_adapter-extra-tensor", lambda t: load_adapter_after(t, edit_tensors=lambda d: d.__setitem__("scale", torch.zeros(1))),
      ValueError, r"unexpected tensor 'scale'"),
    C("keys-load_adapter-lora_A-misshaped", lambda t: load_adapter_after(
        t, edit_tensors=lambda d: d.__setitem__("base_model.model.0.lora_A.weight", torch.zeros(4, 63))),
      ValueError, r"layer '0' expects lora_A \[r, 64\] and lora_B \[32, r\], got \[4, 63\] and \[32, 4\]"),
    C("keys-load_adapter-rank-disagrees", lambda t: load_adapter_after(
        t, edit_tensors=lambda d: d.__setitem__("base_model.model.2.lora_B.weight", torch.zeros(16, 5))),
      ValueError, r"layer '2' expects lora_A \[r, 32\] and lora_B \[16, r\], got \[4, 32\] and \[16, 5\]"),
    C("keys-load_adapter-lora_A-1d", lambda t: load_adapter_after(
        t, edit_tensors=lambda d: d.__setitem__("base_model.model.0.lora_A.weight", torch.zeros(256))),
      ValueError, r"layer '0' expects lora_A \[r, 64\]"),
    C("keys-load_adapter-peft_type", lambda t: load_adapter_after(t, edit_config=lambda c: c.__setitem__("peft_type", "IA3")),
      ValueError, r"adapter_config.json describes a IA3 adapter, not LORA"),
    C("keys-load_adapter-model-without-Linear4bit", lambda t: load_adapter_after(t, target=model()), ValueError,
      r"no Linear4bit named \['0', '2'\]"),
    # ---- save_quantized / load_quantized
    C("value-save_quantized-max_shard_size-0", lambda t: lowbit.save_quantized(_q(), str(t), max_shard_size=0),
      ValueError, r"max_shard_size must be positive, got 0"),
    C("value-save_quantized-config-list", lambda t: lowbit.save_quantized(_q(), str(t), config=[1]), TypeError,
      r"config must be a transformers PretrainedConfig or a dict, got list"),
    C("file-load_quantized-not-a-dir", lambda t: lowbit.load_quantized(str(t / "nowhere"), device="cpu", model=skeleton(), progress=False),
      FileNotFoundError, r"nowhere' is not a directory"),
    C("file-load_quantized-empty-dir", lambda t: lowbit.load_quantized(str(t), device="cpu", model=skeleton(), progress=False),
      FileNotFoundError, r"has neither model.safetensors nor model.safetensors.index.json"),
    C("keys-load_quantized-missing-quant_map", lambda t: load_quantized_after(t, edit_tensors=lambda d: d.pop("0.weight.quant_map")),
      ValueError, r"0: cannot load the 4-bit weight: .*missing key '0.weight.quant_map'"),
    C("keys-load_quantized-missing-packed", lambda t: load_quantized_after(t, edit_tensors=lambda d: d.pop("0.weight")),
      ValueError, r"lacks 1 tensor\(s\) the model needs: \['0.weight'\]"),
    C("keys-load_quantized-missing-bias", lambda t: load_quantized_after(t, edit_tensors=lambda d: d.pop("0.bias")),
      ValueError, r"lacks 1 tensor\(s\) the model needs: \['0.bias'\]"),
    C("keys-load_quantized-extra", lambda t: load_quantized_after(t, edit_tensors=lambda d: d.__setitem__("5.weight", torch.zeros(3))),
      ValueError, r"no place for: \['5.weight'\]"),
    C("keys-load_quantized-16bit-misshaped", lambda t: load_quantized_after(
        t, edit_tensors=lambda d: d.__setitem__("2.weight", torch.zeros(32, 95))),
      ValueError, r"2.weight: the checkpoint holds shape \[32, 95\], the model expects \[32, 96\]"),
    C("keys-load_quantized-bias-misshaped", lambda t: load_quantized_after(t, edit_tensors=lambda d: d.__setitem__("0.bias", torch.zeros(95))),
      ValueError, r"size mismatch for 0.bias"),
    C("keys-load_quantized-packed-misshaped", lambda t: load_quantized_after(
        t, edit_tensors=lambda d: d.__setitem__("0.weight", d["0.weight"][:-2].clone())),
      ValueError, r"0: quant state: packed weight has 3070 bytes, but shape \[96, 64\] needs 3072"),
    C("keys-load_quantized-other-skeleton", lambda t: load_quantized_after(t, skel=skeleton(80)), ValueError,
      r"0: checkpoint weight has shape \[96, 64\], this layer is \[80, 64\]"),
    C("file-load_quantized-data-bytes-FF", lambda t: load_quantized_after(t, edit_file=fill_data(0xFF)), ValueError,
      r"'0.weight.quant_state.bitsandbytes__nf4' does not hold valid UTF-8 JSON"),
    # ---- optimizers
    C("nonfinite-AdamW8bit-lr-nan", lambda t: AdamW8bit([nn.Parameter(torch.randn(3))], lr=float("nan")), ValueError,
      r"AdamW8bit: lr must be >= 0, got nan"),
    C("nonfinite-AdamW8bit-eps-nan", lambda t: AdamW8bit([nn.Parameter(torch.randn(3))], eps=float("nan")), ValueError,
      r"AdamW8bit: eps must be >= 0, got nan"),
    C("value-AdamW8bit-betas-triple", lambda t: AdamW8bit([nn.Parameter(torch.randn(3))], betas=(0.9, 0.99, 0.9)),
      ValueError, r"betas must be a pair \(beta1, beta2\)"),
    C("value-AdamW8bit-min_8bit_size", lambda t: AdamW8bit([nn.Parameter(torch.randn(3))], min_8bit_size=-1), ValueError,
      r"min_8bit_size must be >= 0, got -1"),
    C("value-PagedAdamW8bit-page_min_size", lambda t: PagedAdamW8bit([nn.Parameter(torch.randn(3))], page_min_size=-1),
      ValueError, r"page_min_size must be >= 0, got -1"),
    C("value-PagedAdamW8bit-lr-neg", lambda t: PagedAdamW8bit([nn.Parameter(torch.randn(3))], lr=-1.0), ValueError,
      r"PagedAdamW8bit: lr must be >= 0, got -1.0"),
    C("dtype-AdamW8bit-param-f64", lambda t: AdamW8bit([nn.Parameter(torch.ones(3).double())]), TypeError,
      r"parameter 0 of group 0 has dtype torch.float64"),
    C("shape-AdamW8bit-param-noncontiguous", lambda t: step_with(nn.Parameter(torch.randn(100, 100).t()), torch.randn(100, 100)),
      ValueError, r"argument 'params\[0\]' must be contiguous"),
    C("keys-AdamW8bit-load-state1-f16", lambda t: load_optimizer(set_state("state1", lambda v: v.half())), ValueError,
      r"state of parameter 0: state1/state2 must both be uint8 or both float32, got torch.float16 and torch.uint8"),
    C("keys-AdamW8bit-load-state1-f32-state2-u8", lambda t: load_optimizer(set_state("state1", lambda v: v.float())),
      ValueError, r"state1/state2 must both be uint8 or both float32, got torch.float32 and torch.uint8"),
    C("keys-AdamW8bit-load-absmax1-count", lambda t: load_optimizer(set_state("absmax1", torch.zeros(3))), ValueError,
      r"absmax1 must be float32 with 40 elements, got torch.float32 with 3"),
    C("keys-AdamW8bit-load-absmax2-f16", lambda t: load_optimizer(set_state("absmax2", lambda v: v.half())), ValueError,
      r"absmax2 must be float32 with 40 elements, got torch.float16"),
    C("keys-AdamW8bit-load-state2-misshaped", lambda t: load_optimizer(set_state("state2", lambda v: v[:-1])), ValueError,
      r"state2 has 9999 elements but the parameter has 10000"),
    C("keys-AdamW8bit-load-missing-step", lambda t: load_optimizer(lambda sd: sd["state"][0].pop("step")), ValueError,
      r"state of parameter 0 lacks \['step'\]"),
    C("keys-AdamW8bit-load-extra-param", lambda t: load_optimizer(lambda sd: sd["state"].__setitem__(7, dict(sd["state"][0]))),
      ValueError, r"state for parameter index 7 matches no parameter"),
    C("keys-AdamW8bit-load-no-state", lambda t: load_optimizer(lambda sd: sd.pop("state")), ValueError,
      r"expected a dict with 'state' and 'param_groups'"),
    # ---- devices: CUDA against CPU (skip without a GPU)
    C("device-dequantize_4bit-absmax-cpu", lambda t: ops.dequantize_4bit(
        w4(dq=False, device="cuda")[0], torch.ones(128), F.get_4bit_code("nf4", "cuda"), 64, [64, 128], torch.float16),
      ValueError, r"argument 'absmax' is on cpu but 'packed' is on cuda", needs_cuda),
    C("device-gemm_4bit-x-cpu", lambda t: F.matmul_4bit(torch.randn(2, 128), *w4(device="cuda")), ValueError,
      r"same device", needs_cuda),
    C("device-gemm_4bit-bias-cpu", lambda t: F.matmul_4bit(torch.randn(2, 128, device="cuda"), *w4(device="cuda"),
                                                          torch.zeros(64)), ValueError, r"'bias'.*cpu|cpu.*'bias'", needs_cuda),
    C("device-quantize_8bit-code-cpu", lambda t: ops.quantize_8bit_blockwise(torch.randn(300, device="cuda"), SIGNED, 256),
      ValueError, r"argument 'code' is on cpu but 'A' is on cuda", needs_cuda),
    C("device-dequantize_8bit-absmax-cpu", lambda t: ops.dequantize_8bit_blockwise(
        torch.zeros(300, dtype=torch.uint8, device="cuda"), torch.ones(2), SIGNED.cuda(), 256, torch.float32),
      ValueError, r"argument 'absmax' is on cpu but 'A' is on cuda", needs_cuda),
    C("device-adamw8bit-grads-cpu", lambda t: adam(params=[torch.randn(5000, device="cuda")]), ValueError,
      r"is on cpu but .* is on cuda|is on cuda.* but .* is on cpu", needs_cuda),
    C("device-AdamW8bit-grad-other-device", lambda t: step_with(nn.Parameter(torch.randn(10, device="cuda")), torch.randn(10)),
      RuntimeError, r"device", needs_cuda),
]


def _q():
    net = model()
    quantize(net, lora_r=0)
    return net


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input_raises(fn, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        fn(tmp_path)


# ---------------------------------------------------------------- corrupted files never load

ADAPTER_CORRUPTIONS = {
    "truncated-half": truncate(0.5),
    "truncated-to-4-bytes": truncate(keep=4),
    "truncated-inside-header": truncate(keep=50),
    "empty": truncate(0.0),
    "header-bytes-flipped": flip_header_bytes,
    "header-length-huge": huge_header_length,
}
CHECKPOINT_CORRUPTIONS = {
    **ADAPTER_CORRUPTIONS,
    "truncated-last-100-bytes": truncate(keep=-100),
    "header-offsets-past-end": edit_header(
        lambda h: h["0.weight.absmax"].__setitem__("data_offsets", [h["0.weight.absmax"]["data_offsets"][0], 10**6])),
    "header-dtype-F32-for-uint8": edit_header(lambda h: h["0.weight"].__setitem__("dtype", "F32")),
}


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError


@pytest.mark.parametrize("corrupt", list(ADAPTER_CORRUPTIONS.values()), ids=list(ADAPTER_CORRUPTIONS))
def test_corrupted_adapter_file_is_refused(corrupt, tmp_path):
    with pytest.raises((_safetensors_error(), ValueError, OSError), match=r"header|deserializ"):
        load_adapter_after(tmp_path, edit_files=lambda wp, cp: corrupt(wp))


@pytest.mark.parametrize("corrupt", list(CHECKPOINT_CORRUPTIONS.values()), ids=list(CHECKPOINT_CORRUPTIONS))
def test_corrupted_checkpoint_file_is_refused(corrupt, tmp_path):
    with pytest.raises((_safetensors_error(), ValueError, OSError), match=r"header|deserializ|offset"):
        load_quantized_after(tmp_path, edit_file=corrupt)


def test_interrupted_shard_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save_quantized that fails in the middle of writing leaves the earlier
    model.safetensors whole (the write goes to a temporary name first)."""
    import safetensors.torch

    d = quant_dir(tmp_path)
    before = open(os.path.join(d, "model.safetensors"), "rb").read()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        lowbit.save_quantized(_q(), d)
    monkeypatch.undo()
    assert open(os.path.join(d, "model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(d)) == ["model.safetensors"]
    lowbit.load_quantized(d, device="cpu", model=skeleton(), progress=False)


# ---------------------------------------------------------------- unusual but valid: the reference result

ODD_SIZES = [(1,), (3,), (97,), (13, 97), (1021,), (31, 257), (4099,), (2, 3, 5)]


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", ODD_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_odd_and_prime_sizes_quantize_like_the_reference(shape, blocksize):
    x = torch.randn(shape)
    packed, st = F.quantize_4bit(x, blocksize, double_quant=False)
    want_packed, want_absmax = ref.quantize_4bit(x, blocksize, "nf4")
    assert torch.equal(packed.view(-1), want_packed.view(-1))
    assert torch.equal(st.absmax, want_absmax)
    out = F.dequantize_4bit(packed, st, torch.float32)
    assert out.shape == x.shape
    assert torch.equal(out, ref.dequantize_4bit(want_packed, want_absmax, st.code, blocksize, shape, torch.float32))


def _matmul_check(x, packed, st, bias=None):
    out = F.matmul_4bit(x, packed, st, bias)
    w32 = F.dequantize_4bit(packed, st, torch.float32)
    ref64 = x.double() @ w32.double().t() + (0 if bias is None else bias.double())
    base = (x.float() @ w32.t() + (0 if bias is None else bias.float())).to(x.dtype)
    assert out.shape == (*x.shape[:-1], st.shape[0]) and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).norm().item()
    err_base = (base.double() - ref64).norm().item()
    assert err <= 2 * err_base + 1e-6 * ref64.norm().item() + 1e-30, (err, err_base)
    return out


# (N, K, blocksize): K not a multiple of the block (blocks straddle rows), primes, ones
MATMUL_SHAPES = [(1, 1, 64), (13, 97, 64), (31, 257, 32), (7, 100, 64), (5, 4099, 4096), (97, 61, 128), (2, 3, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("N,K,blocksize", MATMUL_SHAPES, ids=lambda v: str(v))
def test_odd_shapes_matmul_like_dequantize_then_matmul(N, K, blocksize, dq, dtype):
    packed, st = F.quantize_4bit(torch.randn(N, K) * 0.1, blocksize, double_quant=dq)
    for M in (1, 3, 17):
        _matmul_check(torch.randn(M, K).to(dtype), packed, st, torch.randn(N).to(dtype))


def test_non_contiguous_and_zero_size_inputs_matmul():
    packed, st = F.quantize_4bit(torch.randn(13, 97) * 0.1, 32)
    base = torch.randn(97, 20)
    for x in (base.t(), torch.randn(20, 2 * 97)[:, ::2], torch.randn(4, 5, 97).transpose(0, 1)):
        out = _matmul_check(x, packed, st)
        assert torch.equal(out, F.matmul_4bit(x.contiguous(), packed, st))
    for shape in ((0, 97), (3, 0, 97)):
        x = torch.randn(shape, requires_grad=True)
        out = F.matmul_4bit(x, packed, st)
        assert out.shape == (*shape[:-1], 13)
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_zero_size_everywhere():
    packed, st = F.quantize_4bit(torch.empty(0, 64))
    assert packed.numel() == 0 and F.dequantize_4bit(packed, st).shape == (0, 64)
    q, am = ops.quantize_8bit_blockwise(torch.empty(0), SIGNED, 256)
    assert q.numel() == 0 and am.numel() == 0
    assert ops.dequantize_8bit_blockwise(q, am, SIGNED, 256, torch.float32).numel() == 0
    lin = layer()
    x = torch.randn(0, 128, requires_grad=True)
    y = lin(x)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 128) and lin.lora_B.grad is not None and not lin.lora_B.grad.any()
    p = nn.Parameter(torch.zeros(0, 5))
    step_with(p, torch.zeros(0, 5))
    adam(n=0)


def test_non_contiguous_gradient_steps_like_contiguous():
    g = torch.randn(200, 100).t()
    a, b = nn.Parameter(torch.randn(100, 200)), None
    b = nn.Parameter(a.detach().clone())
    step_with(a, g)
    step_with(b, g.contiguous())
    assert torch.equal(a, b)


@pytest.mark.parametrize("in_f,out_f", [(97, 13), (1, 1), (257, 31), (3, 4099)])
def test_linear4bit_prime_features_match_merged_reference(in_f, out_f):
    lin = nn.Linear(in_f, out_f)
    q = Linear4bit.from_linear(lin, r=3, compute_dtype=torch.float32, blocksize=32)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(5, in_f)
    merged = q.merge(torch.float32)
    torch.testing.assert_close(q(x), merged(x), rtol=1e-4, atol=1e-4)


def test_nan_gradient_elements_keep_their_parameters():
    p = nn.Parameter(torch.randn(5000))
    before = p.detach().clone()
    g = torch.randn(5000)
    g[::7] = float("nan")
    g[3::7] = float("inf")
    step_with(p, g)
    bad = ~torch.isfinite(g)
    assert torch.equal(p[bad], before[bad]) and torch.isfinite(p).all()
    assert not torch.equal(p[~bad], before[~bad])


# ---------------------------------------------------------------- known gaps: closed ones, and strict xfails


def gemm_4bit_t_with_offset(offset):
    packed, st = w4()
    absmax, code, blocksize, nested_absmax, nested_code, _, nested_blocksize = st.quant_args()
    return ops.gemm_4bit_t(torch.randn(2, 64), packed, absmax, code, blocksize, 64, 128, nested_absmax, nested_code,
                           offset, nested_blocksize)


MIXED_META = {
    "dequantize_4bit-absmax": (lambda: ops.dequantize_4bit(
        w4(dq=False)[0], torch.ones(128, device="meta"), F.get_4bit_code("nf4"), 64, [64, 128], torch.float32),
        r"lowbit.dequantize_4bit: argument 'absmax' is on meta but 'packed' is on cpu"),
    "dequantize_4bit-state": (lambda: F.dequantize_4bit(w4()[0], w4()[1].to("meta")),
                              r"lowbit.dequantize_4bit: argument 'code' is on meta but 'packed' is on cpu"),
    "dequantize_8bit-absmax": (lambda: ops.dequantize_8bit_blockwise(
        torch.zeros(1000, dtype=torch.uint8), torch.ones(4, device="meta"), SIGNED, 256, torch.float32),
        r"lowbit.dequantize_8bit_blockwise: argument 'absmax' is on meta but 'A' is on cpu"),
    "quantize_8bit-code": (lambda: ops.quantize_8bit_blockwise(torch.randn(1000), SIGNED.to("meta"), 256),
                           r"lowbit.quantize_8bit_blockwise: argument 'code' is on meta but 'A' is on cpu"),
    "quantize_8bit-A": (lambda: ops.quantize_8bit_blockwise(torch.randn(1000, device="meta"), SIGNED, 256),
                        r"lowbit.quantize_8bit_blockwise: argument 'code' is on cpu but 'A' is on meta"),
    "gemm_4bit-bias": (lambda: F.matmul_4bit(torch.randn(2, 128), *w4(), torch.zeros(64, device="meta")),
                       r"lowbit.gemm_4bit: argument 'bias' is on meta but 'x' is on cpu"),
    "gemm_4bit-x": (lambda: F.matmul_4bit(torch.randn(2, 128, device="meta"), *w4()),
                    r"lowbit.gemm_4bit: argument 'packed' is on cpu but 'x' is on meta"),
    "gemm_4bit_t-offset": (lambda: gemm_4bit_t_with_offset(torch.zeros((), device="meta")),
                           r"lowbit.gemm_4bit_t: argument 'offset' is on meta but 'packed' is on cpu"),
    "adamw8bit-grads": (lambda: adam(grads=[torch.randn(5000, device="meta")]),
                        r"lowbit.adamw8bit_step: argument 'grads\[0\]' is on meta but 'params\[0\]' is on cpu"),
}


@pytest.mark.parametrize("name", list(MIXED_META))
def test_mixed_meta_and_cpu_arguments_are_refused(name):
    """A meta tensor among CPU tensors dispatches to the fake kernel; it must
    raise like the CPU/CUDA kernels do for arguments on different devices,
    not return uninitialised memory (or, for the in-place step, do nothing)."""
    fn, match = MIXED_META[name]
    with pytest.raises(ValueError, match=match):
        fn()


def test_all_meta_arguments_still_give_meta_outputs():
    packed, st = w4()
    st = st.to("meta")
    out = F.dequantize_4bit(packed.to("meta"), st)
    assert out.is_meta and out.shape == (64, 128)
    y = F.matmul_4bit(torch.randn(2, 128, device="meta"), packed.to("meta"), st, torch.zeros(64, device="meta"))
    assert y.is_meta and y.shape == (2, 64)
    q, am = ops.quantize_8bit_blockwise(torch.randn(1000, device="meta"), SIGNED.to("meta"), 256)
    assert q.is_meta and am.shape == (4,)


@pytest.mark.parametrize("dq", [False, True])
def test_quantize_4bit_on_meta_gives_meta_outputs(dq):
    """The NaN/Inf check needs values; on meta it is skipped and the shapes flow through."""
    packed, st = F.quantize_4bit(torch.randn(64, 128, device="meta"), double_quant=dq)
    assert packed.is_meta and st.absmax.is_meta and packed.shape == (4096, 1) and st.absmax.shape == (128,)
    assert st.nested == dq and (not dq or (st.nested_absmax.is_meta and st.offset.is_meta))
    assert F.dequantize_4bit(packed, st).is_meta


def test_linear4bit_refuses_integer_input():
    with pytest.raises((ValueError, TypeError), match=r"dtype|int"):
        layer()(torch.ones(2, 128, dtype=torch.int32))


def test_linear4bit_refuses_0dim_input():
    with pytest.raises(ValueError, match=r"input"):
        layer()(torch.tensor(1.0))


def test_save_quantized_refuses_a_meta_model(tmp_path):
    d = tmp_path / "out"
    with pytest.raises(ValueError, match=r"save_quantized: tensors on the meta device cannot be saved: "
                                         r"\['0\.weight', '0\.bias', '0\.weight\.absmax'"):
        lowbit.save_quantized(nn.Sequential(Linear4bit(64, 8, device="meta")), str(d))
    assert not d.exists()


@pytest.mark.parametrize("what", ["adapter", "checkpoint"])
def test_corrupted_file_error_names_the_file(what, tmp_path):
    """safetensors' own error says what is wrong but not which file; the loaders name it."""
    if what == "adapter":
        path = os.path.join(str(tmp_path), "adapter", ADAPTER_W)
        with pytest.raises(ValueError) as ei:
            load_adapter_after(tmp_path, edit_files=lambda wp, cp: truncate(0.5)(wp))
        assert str(ei.value).startswith(f"load_adapter: {path} is not a valid safetensors file")
    else:
        path = os.path.join(str(tmp_path), "quant", "model.safetensors")
        with pytest.raises(ValueError) as ei:
            load_quantized_after(tmp_path, edit_file=truncate(0.5))
        assert str(ei.value).startswith(f"{path} is not a valid safetensors file")
    assert "truncated or corrupted" in str(ei.value) and "deserializing header" in str(ei.value)
    assert isinstance(ei.value.__cause__, _safetensors_error())


def test_corrupted_shard_error_names_the_shard(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    lowbit.quantize_model(net, lora_r=0, skip_modules=("2",), progress=False)
    d = str(tmp_path / "quant")
    names = lowbit.save_quantized(net, d, max_shard_size=2000)
    assert len(names) > 1
    bad = os.path.join(d, names[-1])
    truncate(0.5)(bad)
    with pytest.raises(ValueError, match=r"^" + re.escape(bad) + r" is not a valid safetensors file"):
        lowbit.load_quantized(d, device="cpu", model=skeleton(), progress=False)


BAD_ADAPTER_CONFIGS = {
    "not-json": (lambda wp, cp: open(cp, "w").write("{nope"), r"adapter_config.json is not valid JSON"),
    "not-utf8": (lambda wp, cp: open(cp, "wb").write(b"\xff\xfe{}"), r"adapter_config.json is not valid JSON"),
    "a-list": (lambda wp, cp: open(cp, "w").write("[1, 2]"),
               r"adapter_config.json holds a JSON list, expected an object"),
    "lora_alpha-string": (lambda wp, cp: json.dump({"peft_type": "LORA", "lora_alpha": "big"}, open(cp, "w")),
                          r"adapter_config.json: 'lora_alpha' must be a finite number, got 'big'"),
    "lora_alpha-nan": (lambda wp, cp: open(cp, "w").write('{"lora_alpha": NaN}'),
                       r"adapter_config.json: 'lora_alpha' must be a finite number, got nan"),
    "lora_dropout-string": (lambda wp, cp: json.dump({"lora_dropout": "0.1"}, open(cp, "w")),
                            r"adapter_config.json: 'lora_dropout' must be a number in \[0, 1\), got '0.1'"),
    "alpha_pattern-list": (lambda wp, cp: json.dump({"alpha_pattern": [8]}, open(cp, "w")),
                           r"adapter_config.json: 'alpha_pattern' must be an object"),
    "alpha_pattern-entry": (lambda wp, cp: json.dump({"alpha_pattern": {"0": "x"}}, open(cp, "w")),
                            r"adapter_config.json: 'alpha_pattern' entry '0' must be a finite number, got 'x'"),
}


@pytest.mark.parametrize("name", list(BAD_ADAPTER_CONFIGS))
def test_malformed_adapter_config_is_named(name, tmp_path):
    edit, match = BAD_ADAPTER_CONFIGS[name]
    with pytest.raises(ValueError, match=r"^load_adapter: .*" + match):
        load_adapter_after(tmp_path, edit_files=edit)


def test_adapter_config_with_null_alpha_pattern_loads(tmp_path):
    done = load_adapter_after(tmp_path, edit_config=lambda c: c.update(alpha_pattern=None, rank_pattern=None))
    assert sorted(done) == ["0", "2"]


def _nan_like(v):
    return torch.full_like(v, float("nan"))


NON_FINITE_STATES = {
    "QuantState-nested_offset-nan": (
        lambda: from_sd(lambda sd: None, lambda m: m.__setitem__("nested_offset", float("nan"))),
        r"quant state under prefix 'w\.': 'nested_offset' in the JSON of 'w\.quant_state\.bitsandbytes__nf4' "
        r"must be a finite number, got nan"),
    "QuantState-nested_offset-inf": (
        lambda: from_sd(lambda sd: None, lambda m: m.__setitem__("nested_offset", float("-inf"))),
        r"'nested_offset' .* must be a finite number, got -inf"),
    "QuantState-absmax-inf": (
        lambda: F.QuantState.from_state_dict(
            {**w4(dq=False)[1].to_state_dict("w."), "w.absmax": torch.full((128,), float("inf"))}, "w."),
        r"'w\.absmax' holds NaN or Inf \(128 of 128 values, the first at index 0, inf\)"),
    "QuantState-absmax-one-nan": (
        lambda: F.QuantState.from_state_dict(
            {**w4(dq=False)[1].to_state_dict("w."), "w.absmax": torch.ones(128).index_fill_(0, torch.tensor([5]),
                                                                                        float("nan"))}, "w."),
        r"'w\.absmax' holds NaN or Inf \(1 of 128 values, the first at index 5, nan\)"),
    "QuantState-nested_absmax-nan": (
        lambda: from_sd(lambda sd: sd.__setitem__("w.nested_absmax", _nan_like(sd["w.nested_absmax"]))),
        r"'w\.nested_absmax' holds NaN or Inf"),
    "QuantState-quant_map-nan": (
        lambda: from_sd(lambda sd: sd.__setitem__("w.quant_map", _nan_like(sd["w.quant_map"]))),
        r"'w\.quant_map' holds NaN or Inf"),
    "Linear4bit-nested_absmax-nan": (
        lambda: load_layer(lambda sd: sd.__setitem__("weight.nested_absmax", _nan_like(sd["weight.nested_absmax"]))),
        r"Linear4bit: cannot load the 4-bit weight: .*'weight\.nested_absmax' holds NaN or Inf"),
    "AdamW8bit-absmax1-nan": (lambda: load_optimizer(set_state("absmax1", _nan_like)), r"absmax1 holds NaN or Inf"),
}


@pytest.mark.parametrize("fn,match", list(NON_FINITE_STATES.values()), ids=list(NON_FINITE_STATES))
def test_non_finite_loaded_scales_are_refused(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_non_numeric_nested_offset_is_named():
    for bad in ("abc", None, [1.0], True):
        with pytest.raises(ValueError, match=r"quant state under prefix 'w\.': 'nested_offset' in the JSON of "
                                             r"'w\.quant_state\.bitsandbytes__nf4' must be a finite number, got "):
            from_sd(lambda sd: None, lambda m: m.__setitem__("nested_offset", bad))


def test_non_numeric_lr_is_named():
    with pytest.raises((TypeError, ValueError), match=r"lr"):
        AdamW8bit([nn.Parameter(torch.randn(3))], lr="0.1")
