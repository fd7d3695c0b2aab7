"""Plain-PyTorch references for the quantization math (float32/float64), written
from the format description alone, independent of lowbit's C++ code."""
import struct
from decimal import Decimal
from fractions import Fraction

import torch

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)  # fmt: skip


def f32_literal(text: str) -> float:
    """The float32 a C/CUDA literal `<text>f` denotes: the decimal rounded once,
    to the nearest float32 (ties to even). Going through a Python float first
    rounds twice, and for four of the NF4 midpoints below the double lands
    exactly halfway between two floats, so torch.tensor(float(text)) would be
    one ulp off the constant bitsandbytes' kernel (and the SPEC) compares with."""
    exact = Fraction(Decimal(text))
    near = struct.unpack("<I", struct.pack("<f", float(exact)))[0]

    def value(bits):
        return Fraction(struct.unpack("<f", struct.pack("<I", bits))[0])

    best = min((near - 1, near, near + 1), key=lambda b: (abs(value(b) - exact), b & 1))
    return struct.unpack("<f", struct.pack("<I", best))[0]


# SPEC section 2's midpoints, as written there.
NF4_MIDPOINTS = torch.tensor([f32_literal(t) for t in """
    -0.8480964004993439 -0.6106329262256622 -0.4599952697753906 -0.33967943489551544
    -0.23460740596055984 -0.13791173323988914 -0.045525018125772476 0.03979014977812767
    0.1202552504837513 0.2035212516784668 0.2920137718319893 0.3893125355243683
    0.5016634166240692 0.6427869200706482 0.8614784181118011""".split()], dtype=torch.float32)

# bnb's FP4 magnitude thresholds (its CUDA kernel's float constants), and the
# code of each magnitude bucket in ascending order.
FP4_THRESHOLDS = torch.tensor(
    [f32_literal(t) for t in "0.00260417 0.0859375 0.20833333 0.29166667 0.4166667 0.583333 0.8333333".split()],
    dtype=torch.float32)
FP4_BUCKET_CODE = torch.tensor([0, 1, 6, 7, 4, 5, 2, 3], dtype=torch.uint8)
FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0] * 2, dtype=torch.float32) / 12.0
FP4[8:] *= -1


def blocks_absmax(x: torch.Tensor, blocksize: int):
    """float32 absmax per block of the flattened tensor, NaN for blocks with non-finite values."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    am = blocks.abs().amax(dim=1)
    am[~torch.isfinite(blocks).all(dim=1)] = float("nan")
    return padded, am


def scaled(x, blocksize):
    padded, am = blocks_absmax(x, blocksize)
    # A block with absmax below 2^-64 is scaled up by 2^64 first, so the
    # reciprocal of a subnormal absmax does not overflow (SPEC 2's nearest
    # code for every block); for all others the 2^0 factor changes nothing.
    pre = torch.where(am < 2.0**-64, torch.full_like(am, 2.0**64), torch.ones_like(am))
    inv = torch.where(am > 0, 1.0 / (am * pre), torch.zeros_like(am))
    return ((padded.view(-1, blocksize) * pre[:, None]) * inv[:, None]).reshape(-1), am


def encode_nf4(s):
    return torch.bucketize(s, NF4_MIDPOINTS, right=False).to(torch.uint8)


def encode_fp4(s):
    sign = (s < 0).to(torch.uint8) * 8
    mag = FP4_BUCKET_CODE[torch.bucketize(s.abs(), FP4_THRESHOLDS, right=False)]
    return mag | sign


def quantize_4bit(x, blocksize=64, quant_type="nf4"):
    n = x.numel()
    s, am = scaled(x, blocksize)
    codes = (encode_nf4 if quant_type == "nf4" else encode_fp4)(s[:n])
    if n % 2:
        codes = torch.cat([codes, torch.tensor([7 if quant_type == "nf4" else 0], dtype=torch.uint8)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), am


def unpack(packed, n):
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(packed, absmax, code, blocksize, shape, dtype):
    n = torch.Size(shape).numel()
    vals = code[unpack(packed, n)]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (vals * scale).to(dtype).reshape(shape)


def nearest_8bit(x, code):
    """Index of the nearest code entry; exact midpoint ties to the lower one."""
    mids = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(x, mids, right=False).to(torch.uint8)


def quantize_8bit(x, code, blocksize):
    n = x.numel()
    s, am = scaled(x, blocksize)
    return nearest_8bit(s[:n], code).view(x.shape), am


def dequantize_8bit(q, absmax, code, blocksize, dtype=torch.float32):
    n = q.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.reshape(-1).long()] * scale).to(dtype).view(q.shape)
