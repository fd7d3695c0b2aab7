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

// The fast encoders used by the quantize kernels and the CPU alike. A scaled
// value is clamped to [-1, 1] (|s| to [0, 1] for FP4) and rounded onto a grid
// of step 1/16; grid point i owns the closed cell of values that round to it.
// A cell (width 1/16 = 0.0625) is narrower than the gap between any two
// neighbouring thresholds (NF4 midpoints are 0.08 or more apart, FP4's
// thresholds 0.083 or more) and no threshold lies within 0.004 of a cell
// edge, so each cell holds at most one threshold: the code is the cell's
// lower-edge code plus one past that threshold. One table byte, one table
// float and one comparison give the exact nearest code, ties included. The
// tables are small (33 and 17 cells): the lanes of a warp read distinct
// shared-memory banks (or broadcast), so the lookups never conflict.
// Values off the grid (a stale scale, +-inf) take the end cells; NaN clamps
// to the low end (code 0).
constexpr int kCells = 64;       // table entries per quant type (33 / 17 used)
constexpr float kCellsPerUnit = 16.0f;

struct EncoderTables {
  uint8_t nf4_code[kCells];  // code of cell i's lower edge (i - 1/2) / 16 - 1
  uint8_t fp4_code[kCells];  // magnitude bucket of cell i's lower edge (i - 1/2) / 16
  float nf4_thr[kCells];     // the threshold inside cell i, NaN if none (no comparison passes)
  float fp4_thr[kCells];
  bool one_per_cell;         // checked at compile time below

  constexpr EncoderTables() : nf4_code(), fp4_code(), nf4_thr(), fp4_thr(), one_per_cell(true) {
    for (int i = 0; i < kCells; ++i) {
      const double lo = (i - 0.5) / 16.0, hi = (i + 0.5) / 16.0;
      int c = 0, b = 0, nc = 0, nb = 0;
      nf4_thr[i] = fp4_thr[i] = __builtin_nanf("");
      for (float m : kNF4Midpoints) {
        const double t = static_cast<double>(m) + 1.0;
        c += t < lo;
        if (t >= lo && t <= hi) {
          nf4_thr[i] = m;
          ++nc;
        }
      }
      for (float m : kFP4Thresholds) {
        const double t = static_cast<double>(m);
        b += t < lo;
        if (t >= lo && t <= hi) {
          fp4_thr[i] = m;
          ++nb;
        }
      }
      nf4_code[i] = static_cast<uint8_t>(c);
      fp4_code[i] = static_cast<uint8_t>(b);
      if (nc > 1 || nb > 1) one_per_cell = false;
    }
  }
};

static constexpr EncoderTables kEncoderTables{};
static_assert(kEncoderTables.one_per_cell, "a grid cell holds two thresholds: make the cells finer");

LOWBIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LOWBIT_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
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

LOWBIT_HD uint8_t encode_nf4_fast(const uint8_t* code, const float* thr, float s) {
  const uint32_t i = grid_cell(clamp_to(s, -1.0f, 1.0f) * kCellsPerUnit, kCellsPerUnit);
  return static_cast<uint8_t>(code[i] + (s > thr[i] ? 1 : 0));
}

LOWBIT_HD uint8_t encode_fp4_fast(const uint8_t* code, const float* thr, float s) {
  const uint32_t sign = s < 0.0f ? 8u : 0u;
  const float a = s < 0.0f ? -s : s;
  const uint32_t i = grid_cell(clamp_to(a, 0.0f, 1.0f) * kCellsPerUnit, 0.0f);
  const int b = code[i] + (a > thr[i] ? 1 : 0);
  return static_cast<uint8_t>(((0x32547610u >> (4 * b)) & 0xFu) | sign);
}

// The encoder of one quant type: its cell tables (host copies here; the
// kernels use copies in shared memory).
struct Encoder4 {
  const uint8_t* code;
  const float* thr;
};

inline Encoder4 host_encoder(QuantType qt) {
  return qt == QuantType::NF4 ? Encoder4{kEncoderTables.nf4_code, kEncoderTables.nf4_thr}
                              : Encoder4{kEncoderTables.fp4_code, kEncoderTables.fp4_thr};
}

LOWBIT_HD uint8_t encode_4bit(QuantType qt, const Encoder4& e, float s) {
  return qt == QuantType::NF4 ? encode_nf4_fast(e.code, e.thr, s) : encode_fp4_fast(e.code, e.thr, s);
}

// The factor a block's values are scaled by before encoding: v * (1/absmax),
// a multiply by the reciprocal as bnb does (not a divide). An all-zero block
// (absmax 0) scales by 0 so every element encodes as 0.0; a NaN absmax (a
// block holding a non-finite value) also scales by 0: its codes are
// meaningless and the NaN absmax flags it. A block whose absmax is below
// 2^-64 is first scaled up by 2^64 (exact for these magnitudes): its
// reciprocal would otherwise overflow (absmax < 1/FLT_MAX, a subnormal) or
// lose bits. For every other block `pre` is 1 and the result is bit for bit
// v * (1/absmax).
struct InverseScale {
  float pre, inv;
  LOWBIT_HD float operator()(float v) const { return (v * pre) * inv; }
};
LOWBIT_HD InverseScale inverse_scale(float absmax) {
  if (!(absmax > 0.0f)) return InverseScale{1.0f, 0.0f};
  if (absmax < 0x1p-64f) return InverseScale{0x1p64f, 1.0f / (absmax * 0x1p64f)};
  return InverseScale{1.0f, 1.0f / absmax};
}

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

// A faster exact encoder for a sorted 256-entry map, used by the optimizer
// kernels. encode_8bit(code, x) equals the number of midpoints strictly below
// x (midpoint i = (code[i] + code[i+1]) * 0.5f), for x clamped to [-1, 1].
// The clamped x falls into one of kMapCells cells cut along its float bits:
// sign, 25 binades (2^-24 .. 1) of 128 cells each (the top 7 mantissa bits)
// and one cell for |x| < 2^-24, ordered by value. A table gives, per cell,
// the number of midpoints in earlier cells; when no cell holds two midpoints
// (true of both dynamic maps: the finest, the unsigned map's top decade, has
// its midpoints 0.007 apart against cells of 0.0039), the code is that count
// plus one if x lies above the next midpoint. One byte and one float lookup
// replace the eight probes of a binary search.
constexpr uint32_t kMapCellFloor = (103u << 7) - 1u;                    // bits >> 16 of the largest |x| < 2^-24
constexpr int kMapCellsPerSign = static_cast<int>((127u << 7) - kMapCellFloor) + 1;  // |x| <= 1
constexpr int kMapCells = 2 * kMapCellsPerSign;

// Cell of x in [-1, 1] (not NaN), non-decreasing in x.
LOWBIT_HD uint32_t map_cell(float x) {
  const uint32_t b = float_bits(x);
  const uint32_t a = (b >> 16) & 0x7FFFu;
  const uint32_t mag = (a > kMapCellFloor ? a : kMapCellFloor) - kMapCellFloor;
  const uint32_t neg = 0u - (b >> 31);  // all ones for a negative x: mag ^ neg = -1 - mag
  return static_cast<uint32_t>(kMapCellsPerSign) + (mag ^ neg);
}

LOWBIT_HD float map_midpoint(const float* code, int i) { return (code[i] + code[i + 1]) * 0.5f; }

// The pieces of the cell table, shared by the host builder below and the CUDA
// one (optim/optim_kernels.cuh), which runs them one thread per index.
//
// Midpoint i of `code` when entries i and i+1 are ascending, inside [-1, 1]
// and have their midpoint strictly between them; NaN otherwise (such a map
// cannot use the table).
LOWBIT_HD float map_midpoint_checked(const float* code, int i) {
  const float m = map_midpoint(code, i);
  const bool ok = code[i] >= -1.0f && code[i + 1] <= 1.0f && code[i] < m && m < code[i + 1];
  return ok ? m : float_from_bits(0x7FC00000u);
}

// Table entry of cell o: the midpoints in earlier cells, a lower bound over
// the 255 ascending midpoint cells.
LOWBIT_HD uint8_t map_cell_count(const uint32_t* cells, uint32_t o) {
  int lo = 0, len = 255;
  while (len > 0) {
    const int half = len >> 1;
    if (cells[lo + half] < o) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return static_cast<uint8_t>(lo);
}

// Host construction of the cell table (count[kMapCells]) and midpoints
// (mid[256], mid[255] = NaN so no value passes it). Returns false when the
// map is not strictly ascending in [-1, 1] or a cell would hold two
// midpoints; the caller then keeps the binary search.
inline bool build_map_cells(const float* code, uint8_t* count, float* mid) {
  uint32_t cells[255];
  for (int i = 0; i < 255; ++i) {
    mid[i] = map_midpoint_checked(code, i);
    if (mid[i] != mid[i]) return false;
    cells[i] = map_cell(mid[i]);
    if (i > 0 && cells[i] <= cells[i - 1]) return false;
  }
  mid[255] = __builtin_nanf("");
  for (int o = 0; o < kMapCells; ++o) count[o] = map_cell_count(cells, static_cast<uint32_t>(o));
  return true;
}

LOWBIT_HD uint8_t encode_8bit_cells(const uint8_t* count, const float* mid, float x) {
  const float c = clamp_to(x, -1.0f, 1.0f);
  const uint32_t t = count[map_cell(c)];
  return static_cast<uint8_t>(t + (c > mid[t] ? 1u : 0u));
}

}  // namespace core
}  // namespace lowbit
