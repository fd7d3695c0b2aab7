#pragma once
// Torch-free code books and element encoders shared by the CPU reference, the
// CUDA kernels and the Catch2 tests. Everything here is plain float32 IEEE
// arithmetic (no fused multiply-add, no fast-math) so host and device agree bit
// for bit.
#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {
namespace core {

enum class QuantType : int { NF4 = 0, FP4 = 1 };

// Code -> value, exactly as bitsandbytes stores them in `quant_map`.
#define LOWBIT_NF4_VALUES                                                           \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,         \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,    \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,             \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,              \
      0.7229568362236023f, 1.0f

// bnb's FP4: bit 3 is the sign, the low 3 bits index these magnitudes.
#define LOWBIT_FP4_VALUES                                                           \
  0.0f, 0.005208333333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f,  \
      0.25f, -0.0f, -0.005208333333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f, \
      -0.1666666667f, -0.25f

static constexpr float kNF4Values[16] = {LOWBIT_NF4_VALUES};
static constexpr float kFP4Values[16] = {LOWBIT_FP4_VALUES};

// The code that 0.0 encodes to: the padding nibble of an odd-length tensor and
// the code of every element of an all-zero block.
LOWBIT_HD uint8_t zero_code(QuantType qt) { return qt == QuantType::NF4 ? 7 : 0; }

// float32 midpoints between neighbouring NF4 values, ascending.
#define LOWBIT_NF4_MIDPOINTS                                                                \
  -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,  \
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f,                 \
      0.03979014977812767f, 0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f,  \
      0.3893125355243683f, 0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f

// bnb-FP4 magnitude thresholds, ascending: the float constants bitsandbytes'
// CUDA kernel compares against (near-midpoints of the sorted magnitudes
// {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}).
#define LOWBIT_FP4_THRESHOLDS 0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f

static constexpr float kNF4Midpoints[15] = {LOWBIT_NF4_MIDPOINTS};
static constexpr float kFP4Thresholds[7] = {LOWBIT_FP4_THRESHOLDS};

// Nearest NF4 code of a value already scaled into [-1, 1]: the number of
// midpoints strictly below s, found in four probes of a binary search (a value
// equal to a midpoint goes to the lower code; NaN gives code 0). `mids` is
// kNF4Midpoints or a copy of it (in shared memory on the GPU).
LOWBIT_HD uint8_t encode_nf4(const float* mids, float s) {
  int c = s > mids[7] ? 8 : 0;
  c += s > mids[c + 3] ? 4 : 0;
  c += s > mids[c + 1] ? 2 : 0;
  c += s > mids[c] ? 1 : 0;
  return static_cast<uint8_t>(c);
}

// Nearest bnb-FP4 code: bit 3 is the sign (set for s < 0, so -0.0 keeps 0),
// the magnitude bucket (thresholds below |s|, three probes) maps to the low
// bits through the nibbles of 0x32547610: buckets 0..7 -> codes 0,1,6,7,4,5,2,3.
LOWBIT_HD uint8_t encode_fp4(const float* thresholds, float s) {
  const uint32_t sign = s < 0.0f ? 8u : 0u;
  const float a = s < 0.0f ? -s : s;
  int b = a > thresholds[3] ? 4 : 0;
  b += a > thresholds[b + 1] ? 2 : 0;
  b += a > thresholds[b] ? 1 : 0;
  return static_cast<uint8_t>(((0x32547610u >> (4 * b)) & 0xFu) | sign);
}

// `table` is the quant type's search table: kNF4Midpoints or kFP4Thresholds.
LOWBIT_HD uint8_t encode_4bit(QuantType qt, const float* table, float s) {
  return qt == QuantType::NF4 ? encode_nf4(table, s) : encode_fp4(table, s);
}

inline const float* encode_table(QuantType qt) { return qt == QuantType::NF4 ? kNF4Midpoints : kFP4Thresholds; }

// Scale factor applied to a block: the reciprocal of its absmax (a multiply,
// as bnb does, not a divide). An all-zero block (absmax 0) scales by 0 so every
// element encodes as 0.0; a NaN absmax (a block holding a non-finite value)
// also scales by 0: its codes are meaningless and the NaN absmax flags it.
LOWBIT_HD float inverse_scale(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }

LOWBIT_HD bool is_finite(float v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return __builtin_isfinite(v);
#endif
}

// Running absmax of a block. A non-finite element turns the whole block's
// absmax into NaN, the flag the Python layer turns into an error. Finite
// values never reach +inf through max, so +inf can carry the flag while the
// partial maxima are combined (across threads, with plain fmaxf).
LOWBIT_HD float absmax_term(float v) { return is_finite(v) ? (v < 0.0f ? -v : v) : __builtin_inff(); }
LOWBIT_HD float absmax_combine(float a, float b) { return a > b ? a : b; }
LOWBIT_HD float absmax_finish(float m) { return m == __builtin_inff() ? __builtin_nanf("") : m; }

// Index of the entry of a sorted 256-entry map nearest to x. A value exactly
// halfway between two entries goes to the lower one. Values outside the map's
// range go to its ends; NaN goes to index 0.
LOWBIT_HD uint8_t encode_8bit(const float* code, float x) {
  // Largest index whose entry is <= x (0 if none): 8 halving steps.
  int lo = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) {
    const int probe = lo + step;
    if (probe < 256 && code[probe] <= x) lo = probe;
  }
  if (lo == 255) return 255;
  if (!(code[lo] <= x)) return 0;  // below the first entry, or NaN
  // Between entries lo and lo+1: compare against their float32 midpoint.
  const float mid = (code[lo] + code[lo + 1]) * 0.5f;
  return static_cast<uint8_t>(x > mid ? lo + 1 : lo);
}

}  // namespace core
}  // namespace lowbit
