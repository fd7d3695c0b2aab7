#pragma once
// Host reference of blockwise quantization over a flat array, used by the CPU
// ops and the Catch2 tests. T is any type with a float conversion (float,
// c10::Half, c10::BFloat16); the math is the one in codebook.h, the same the
// CUDA kernels use, so the codes agree byte for byte.
#include <cstdint>

#include "core/codebook.h"

namespace lowbit {
namespace core {

template <typename T>
float block_absmax(const T* x, int64_t count) {
  float m = 0.0f;
  for (int64_t i = 0; i < count; ++i) m = absmax_combine(m, absmax_term(static_cast<float>(x[i])));
  return absmax_finish(m);
}

// Quantizes blocks [block_begin, block_end) of x (n elements) to packed 4-bit
// codes: element 2j in the high nibble of byte j, element 2j+1 in the low one;
// an odd n pads the last low nibble with the code of 0.0.
template <typename T>
void quantize_4bit_blocks(QuantType qt, const T* x, int64_t n, int64_t blocksize, int64_t block_begin,
                          int64_t block_end, uint8_t* packed, float* absmax) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = (n - start) < blocksize ? (n - start) : blocksize;
    const float am = block_absmax(x + start, count);
    absmax[b] = am;
    const InverseScale inv = inverse_scale(am);
    const Encoder4 enc = host_encoder(qt);
    // blocksize is even, so a block starts on a byte boundary.
    for (int64_t i = 0; i < count; i += 2) {
      const uint8_t hi = encode_4bit(qt, enc, inv(static_cast<float>(x[start + i])));
      const uint8_t lo = (i + 1 < count) ? encode_4bit(qt, enc, inv(static_cast<float>(x[start + i + 1])))
                                         : zero_code(qt);
      packed[(start + i) / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

// Per-block scale of a 4-bit weight; with double quantization it is
// rebuilt from its 8-bit code as a product, then the offset is added (two
// roundings, as bnb does: no fused multiply-add).
struct ScaleSource {
  const float* absmax = nullptr;      // plain float32 scales, or
  const uint8_t* absmax_q = nullptr;  // 8-bit codes of (absmax - offset)
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nested_blocksize = 256;
};

inline float block_scale(const ScaleSource& s, int64_t block) {
  if (s.absmax) return s.absmax[block];
  volatile float prod = s.nested_code[s.absmax_q[block]] * s.nested_absmax[block / s.nested_blocksize];
  return prod + s.offset;
}

// out[i] = OutT(code[q_i] * scale(i / blocksize)) for i in [begin, end).
template <typename OutT>
void dequantize_4bit_range(const uint8_t* packed, const float* code, const ScaleSource& scales,
                           int64_t blocksize, int64_t begin, int64_t end, OutT* out) {
  int64_t block = -1;
  float scale = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    if (i / blocksize != block) {
      block = i / blocksize;
      scale = block_scale(scales, block);
    }
    const uint8_t byte = packed[i / 2];
    const uint8_t q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    out[i] = static_cast<OutT>(code[q] * scale);
  }
}

// Blockwise 8-bit quantization against a sorted 256-entry code.
template <typename T>
void quantize_8bit_blocks(const float* code, const T* x, int64_t n, int64_t blocksize, int64_t block_begin,
                          int64_t block_end, uint8_t* out, float* absmax) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = (n - start) < blocksize ? (n - start) : blocksize;
    const float am = block_absmax(x + start, count);
    absmax[b] = am;
    const InverseScale inv = inverse_scale(am);
    for (int64_t i = 0; i < count; ++i) out[start + i] = encode_8bit(code, inv(static_cast<float>(x[start + i])));
  }
}

template <typename OutT>
void dequantize_8bit_range(const uint8_t* q, const float* absmax, const float* code, int64_t blocksize,
                           int64_t begin, int64_t end, OutT* out) {
  for (int64_t i = begin; i < end; ++i) out[i] = static_cast<OutT>(code[q[i]] * absmax[i / blocksize]);
}

}  // namespace core
}  // namespace lowbit
