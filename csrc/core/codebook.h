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

// The exact definitions, by search; the fast encoders below must agree with
// them for every float (the Catch2 tests check that).
//
// Nearest NF4 code of a value already scaled into [-1, 1]: the number of
// midpoints strictly below s, found in four probes of a binary search (a value
// equal to a midpoint goes to the lower code; NaN gives code 0).
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

// The fast encoders used by the quantize kernels and the CPU alike. A value
// is rounded onto a fine grid (step 1/512 over [-1, 3) for NF4, 1/1024 over
// |s| in [0, 2) for FP4); grid point i owns the closed cell of values that
// round to it, [(i - 1/2) step, (i + 1/2) step]. No cell holds two thresholds
// (the closest NF4 midpoints are 0.08 apart, FP4's thresholds 0.0026 or more)
// and none lies on a cell edge, so a cell's code is its lower edge's code `lo`
// or, past the one threshold above it, lo + 1: one table byte and one
// comparison give the exact nearest code, ties included. Values off the grid
// (a stale scale, +-inf) take the end cells; NaN lands in cell 0 (code 0).
constexpr int kCells = 2048;

struct EncoderTables {
  uint8_t nf4_cell[kCells];  // code of cell i's lower edge (i - 1/2) / 512 - 1
  uint8_t fp4_cell[kCells];  // magnitude bucket of cell i's lower edge (i - 1/2) / 1024
  // bound[c + 1] is the threshold above code (bucket) c; NaN after the last,
  // which no comparison passes.
  float nf4_bound[17];
  float fp4_bound[9];

  constexpr EncoderTables() : nf4_cell(), fp4_cell(), nf4_bound(), fp4_bound() {
    for (int i = 0; i < kCells; ++i) {
      const double v = (i - 0.5) / 512.0 - 1.0;
      const double a = (i - 0.5) / 1024.0;
      int c = 0, b = 0;
      for (float m : kNF4Midpoints) c += v > static_cast<double>(m);
      for (float t : kFP4Thresholds) b += a > static_cast<double>(t);
      nf4_cell[i] = static_cast<uint8_t>(c);
      fp4_cell[i] = static_cast<uint8_t>(b);
    }
    nf4_bound[0] = fp4_bound[0] = -__builtin_inff();
    for (int k = 0; k < 15; ++k) nf4_bound[k + 1] = kNF4Midpoints[k];
    nf4_bound[16] = __builtin_nanf("");
    for (int k = 0; k < 7; ++k) fp4_bound[k + 1] = kFP4Thresholds[k];
    fp4_bound[8] = __builtin_nanf("");
  }
};

static constexpr EncoderTables kEncoderTables{};

LOWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Nearest grid index: adding 2^23 leaves the rounded integer in the low
// mantissa bits. The product by a power of two is exact, so a fused
// multiply-add and a multiply followed by an add round identically.
LOWBIT_HD uint32_t grid_cell(float scaled_by_step, float origin) {
  return float_bits(scaled_by_step + (origin + 8388608.0f)) & (kCells - 1);
}

// Clamp with NaN sent to `lo`: the NaN a GPU produces (0x7FFFFFFF) and the
// one x86 produces (0xFFC00000) would otherwise pick different cells.
LOWBIT_HD float clamp_to(float v, float lo, float hi) {
#if defined(__CUDA_ARCH__)
  return fminf(fmaxf(v, lo), hi);
#else
  return v != v ? lo : (v < lo ? lo : (v > hi ? hi : v));
#endif
}

LOWBIT_HD uint8_t encode_nf4_fast(const uint8_t* cell, const float* bound, float s) {
  const int c = cell[grid_cell(clamp_to(s, -1.0f, 2.0f) * 512.0f, 512.0f)];
  return static_cast<uint8_t>(c + (s > bound[c + 1] ? 1 : 0));
}

LOWBIT_HD uint8_t encode_fp4_fast(const uint8_t* cell, const float* bound, float s) {
  const uint32_t sign = s < 0.0f ? 8u : 0u;
  const float a = s < 0.0f ? -s : s;
  int b = cell[grid_cell(clamp_to(a, 0.0f, 1.5f) * 1024.0f, 0.0f)];
  b += a > bound[b + 1] ? 1 : 0;
  return static_cast<uint8_t>(((0x32547610u >> (4 * b)) & 0xFu) | sign);
}

// The encoder of one quant type: its cell table and thresholds (host copies
// here; the kernels use copies in shared memory).
struct Encoder4 {
  const uint8_t* cell;
  const float* bound;
};

inline Encoder4 host_encoder(QuantType qt) {
  return qt == QuantType::NF4 ? Encoder4{kEncoderTables.nf4_cell, kEncoderTables.nf4_bound}
                              : Encoder4{kEncoderTables.fp4_cell, kEncoderTables.fp4_bound};
}

LOWBIT_HD uint8_t encode_4bit(QuantType qt, const Encoder4& e, float s) {
  return qt == QuantType::NF4 ? encode_nf4_fast(e.cell, e.bound, s) : encode_fp4_fast(e.cell, e.bound, s);
}

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
// absmax into NaN, the flag the Python layer turns into an error: |v| keeps
// NaN and inf, the maximum propagates NaN (one max.NaN instruction on the
// GPU), and the finished value is NaN unless finite.
LOWBIT_HD float absmax_term(float v) {
#if defined(__CUDA_ARCH__)
  return fabsf(v);
#else
  return __builtin_fabsf(v);
#endif
}
LOWBIT_HD float absmax_combine(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? __builtin_nanf("") : (a > b ? a : b);
#endif
}
LOWBIT_HD float absmax_finish(float m) { return is_finite(m) ? m : __builtin_nanf(""); }

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
