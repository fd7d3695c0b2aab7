// The element encoders and blockwise reference of csrc/core against brute
// force: nearest code by exhaustive search, exact ties, packing order.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/blockwise.h"
#include "core/codebook.h"
#include "core/dynamic_map.h"

using namespace lowbit::core;

namespace {

// Index of the nearest of `n` sorted values; on a tie the lower index.
int brute_nearest(const float* values, int n, float x) {
  int best = 0;
  for (int i = 1; i < n; ++i) {
    const float mid = (values[i - 1] + values[i]) * 0.5f;
    if (x > mid) best = i;
  }
  return best;
}

std::vector<float> sweep(int count, float lo, float hi) {
  std::vector<float> xs;
  for (int i = 0; i <= count; ++i) xs.push_back(lo + (hi - lo) * static_cast<float>(i) / count);
  return xs;
}

}  // namespace

TEST_CASE("NF4 table is sorted with 0 at code 7 and +-1 at the ends") {
  for (int i = 1; i < 16; ++i) REQUIRE(kNF4Values[i - 1] < kNF4Values[i]);
  REQUIRE(kNF4Values[0] == -1.0f);
  REQUIRE(kNF4Values[7] == 0.0f);
  REQUIRE(kNF4Values[15] == 1.0f);
  REQUIRE(zero_code(QuantType::NF4) == 7);
}

TEST_CASE("encode_nf4 is the nearest code, ties to the lower one") {
  for (float x : sweep(200000, -1.1f, 1.1f)) {
    INFO("x = " << x);
    REQUIRE(encode_nf4(kNF4Midpoints, x) == brute_nearest(kNF4Values, 16, x));
  }
  // The midpoints themselves are the ties.
  const float mids[] = {-0.8480964004993439f, 0.03979014977812767f, 0.8614784181118011f};
  REQUIRE(encode_nf4(kNF4Midpoints, mids[0]) == 0);
  REQUIRE(encode_nf4(kNF4Midpoints, std::nextafter(mids[0], 1.0f)) == 1);
  REQUIRE(encode_nf4(kNF4Midpoints, mids[1]) == 7);
  REQUIRE(encode_nf4(kNF4Midpoints, mids[2]) == 14);
  REQUIRE(encode_nf4(kNF4Midpoints, std::numeric_limits<float>::quiet_NaN()) == 0);
  // Every midpoint is a tie that goes down; the next float up goes to the next code.
  for (int i = 0; i < 15; ++i) {
    REQUIRE(encode_nf4(kNF4Midpoints, kNF4Midpoints[i]) == i);
    REQUIRE(encode_nf4(kNF4Midpoints, std::nextafter(kNF4Midpoints[i], 2.0f)) == i + 1);
  }
}

TEST_CASE("encode_fp4 decodes back to the nearest magnitude with the sign bit") {
  for (float x : sweep(100000, -1.0f, 1.0f)) {
    const uint8_t c = encode_fp4(kFP4Thresholds, x);
    const float v = kFP4Values[c];
    // Nearest up to the CUDA kernel's rounded thresholds: within 1e-6 of the best distance.
    float best = 10.0f;
    for (int i = 0; i < 16; ++i) best = std::min(best, std::fabs(kFP4Values[i] - x));
    INFO("x = " << x << " code " << int(c));
    REQUIRE(std::fabs(v - x) <= best + 1e-6f);
    if (x < 0.0f) REQUIRE((c & 8) == 8);
    if (x > 0.0f) REQUIRE((c & 8) == 0);
  }
  REQUIRE(encode_fp4(kFP4Thresholds, 0.0f) == 0);
  REQUIRE(encode_fp4(kFP4Thresholds, -0.0f) == 0);
  // bnb's decision tree, written out, agrees with the bucket search everywhere.
  auto tree = [](float x) {
    const int sign = x < 0 ? 8 : 0;
    x = std::fabs(x);
    if (x > 0.29166667f) {
      if (x > 0.583333f) return (x > 0.8333333f ? 3 : 2) + sign;
      return (x > 0.4166667f ? 5 : 4) + sign;
    }
    if (x > 0.0859375f) return (x > 0.20833333f ? 7 : 6) + sign;
    return (x > 0.00260417f ? 1 : 0) + sign;
  };
  for (float x : sweep(400000, -1.1f, 1.1f)) REQUIRE(encode_fp4(kFP4Thresholds, x) == tree(x));
  for (float t : kFP4Thresholds) {
    REQUIRE(encode_fp4(kFP4Thresholds, t) == tree(t));
    REQUIRE(encode_fp4(kFP4Thresholds, std::nextafter(t, 2.0f)) == tree(std::nextafter(t, 2.0f)));
  }
}

TEST_CASE("dynamic maps: sorted, signed range and endpoints") {
  for (int i = 1; i < 256; ++i) {
    REQUIRE(kDynamicMapSigned[i - 1] < kDynamicMapSigned[i]);
    REQUIRE(kDynamicMapUnsigned[i - 1] < kDynamicMapUnsigned[i]);
  }
  REQUIRE(kDynamicMapSigned[0] == -0.99296875f);
  REQUIRE(kDynamicMapSigned[127] == 0.0f);
  REQUIRE(kDynamicMapSigned[255] == 1.0f);
  REQUIRE(kDynamicMapUnsigned[0] == 0.0f);
  REQUIRE(kDynamicMapUnsigned[255] == 1.0f);
}

TEST_CASE("encode_8bit is the nearest map entry, ties to the lower one") {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> uni(-1.2f, 1.2f);
  for (int i = 0; i < 200000; ++i) {
    const float x = uni(rng);
    REQUIRE(encode_8bit(kDynamicMapSigned, x) == brute_nearest(kDynamicMapSigned, 256, x));
    const float ax = std::fabs(x);
    REQUIRE(encode_8bit(kDynamicMapUnsigned, ax) == brute_nearest(kDynamicMapUnsigned, 256, ax));
  }
  for (int i = 1; i < 256; ++i) {
    const float mid = (kDynamicMapSigned[i - 1] + kDynamicMapSigned[i]) * 0.5f;
    REQUIRE(encode_8bit(kDynamicMapSigned, mid) == i - 1);
    REQUIRE(encode_8bit(kDynamicMapSigned, kDynamicMapSigned[i]) == i);
  }
  REQUIRE(encode_8bit(kDynamicMapSigned, -5.0f) == 0);
  REQUIRE(encode_8bit(kDynamicMapSigned, 5.0f) == 255);
}

TEST_CASE("blockwise 4-bit: absmax, packing order, odd tail, zero block, non-finite flag") {
  const int64_t n = 64 * 3 + 5;  // two full blocks of 64, a zero block, an odd tail
  std::vector<float> x(n);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (auto& v : x) v = normal(rng);
  for (int i = 64; i < 128; ++i) x[i] = 0.0f;
  const int64_t nblocks = 4;
  std::vector<uint8_t> packed((n + 1) / 2);
  std::vector<float> absmax(nblocks);
  quantize_4bit_blocks(QuantType::NF4, x.data(), n, 64, 0, nblocks, packed.data(), absmax.data());

  float m0 = 0.0f;
  for (int i = 0; i < 64; ++i) m0 = std::max(m0, std::fabs(x[i]));
  REQUIRE(absmax[0] == m0);
  REQUIRE(absmax[1] == 0.0f);
  for (int i = 32; i < 64; ++i) REQUIRE(packed[i] == 0x77);
  // element 2j in the high nibble
  const float inv = 1.0f / absmax[0];
  REQUIRE((packed[0] >> 4) == encode_nf4(kNF4Midpoints, x[0] * inv));
  REQUIRE((packed[0] & 0xF) == encode_nf4(kNF4Midpoints, x[1] * inv));
  // odd tail: the last low nibble is the code of 0.0
  REQUIRE((packed.back() & 0xF) == 7);

  // dequantize reproduces code * absmax
  std::vector<float> out(n);
  ScaleSource s;
  s.absmax = absmax.data();
  dequantize_4bit_range(packed.data(), kNF4Values, s, 64, 0, n, out.data());
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t q = (i & 1) ? (byte & 0xF) : (byte >> 4);
    REQUIRE(out[i] == kNF4Values[q] * absmax[i / 64]);
  }
  for (int i = 64; i < 128; ++i) REQUIRE(out[i] == 0.0f);

  x[200 - 10] = std::numeric_limits<float>::infinity();
  quantize_4bit_blocks(QuantType::NF4, x.data(), n, 64, 0, nblocks, packed.data(), absmax.data());
  REQUIRE(std::isnan(absmax[2]));
  REQUIRE(std::isfinite(absmax[0]));
}

TEST_CASE("nested scales: product rounded before the offset is added") {
  const uint8_t q[2] = {200, 10};
  const float nested_absmax[1] = {0.3f};
  ScaleSource s;
  s.absmax_q = q;
  s.nested_absmax = nested_absmax;
  s.nested_code = kDynamicMapSigned;
  s.offset = 0.125f;
  s.nested_blocksize = 256;
  for (int b = 0; b < 2; ++b) {
    const float prod = kDynamicMapSigned[q[b]] * 0.3f;
    REQUIRE(block_scale(s, b) == prod + 0.125f);
  }
}

TEST_CASE("cell tables: one threshold per cell, codes ascending") {
  for (const uint8_t* code : {kEncoderTables.nf4_code, kEncoderTables.fp4_code})
    for (int i = 1; i < kCells; ++i) REQUIRE(code[i] >= code[i - 1]);
  REQUIRE(kEncoderTables.nf4_code[32] + (std::isnan(kEncoderTables.nf4_thr[32]) ? 0 : 1) == 15);
  REQUIRE(kEncoderTables.fp4_code[16] + (std::isnan(kEncoderTables.fp4_thr[16]) ? 0 : 1) == 7);
}

TEST_CASE("fast cell-table encoders equal the exact search for every kind of float") {
  const Encoder4 nf4 = host_encoder(QuantType::NF4);
  const Encoder4 fp4 = host_encoder(QuantType::FP4);
  auto check = [&](float s) {
    INFO("s = " << s);
    REQUIRE(encode_4bit(QuantType::NF4, nf4, s) == encode_nf4(kNF4Midpoints, s));
    REQUIRE(encode_4bit(QuantType::FP4, fp4, s) == encode_fp4(kFP4Thresholds, s));
  };
  for (float s : sweep(1 << 21, -1.001f, 1.001f)) check(s);
  for (float s : sweep(100000, -50.0f, 50.0f)) check(s);
  // Every threshold and its neighbouring floats, on both sides of zero.
  for (float t : kNF4Midpoints) {
    float lo = t, hi = t;
    for (int k = 0; k < 8; ++k, lo = std::nextafter(lo, -2.0f), hi = std::nextafter(hi, 2.0f)) {
      check(lo);
      check(hi);
    }
  }
  for (float t : kFP4Thresholds) {
    for (float sgn : {1.0f, -1.0f}) {
      float lo = t, hi = t;
      for (int k = 0; k < 8; ++k, lo = std::nextafter(lo, 0.0f), hi = std::nextafter(hi, 2.0f)) {
        check(sgn * lo);
        check(sgn * hi);
      }
    }
  }
  // Grid points, cell edges (odd multiples of 1/32) and the floats around
  // them (where the cell index rounds).
  for (int i = -80; i <= 80; ++i) {
    const float g = i / 32.0f;
    for (float v : {g, std::nextafter(g, -2.0f), std::nextafter(g, 2.0f)}) check(v);
  }
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, sizeof(f));
    if (!std::isnan(f)) check(f);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, 1.0000001f, -1.0000001f, 1e-30f, -1e-30f, 5e-39f, inf, -inf}) check(v);
  // NaN (a flagged block): code 0, as the exact search gives.
  REQUIRE(encode_4bit(QuantType::NF4, nf4, std::numeric_limits<float>::quiet_NaN()) == 0);
  REQUIRE(encode_4bit(QuantType::FP4, fp4, std::numeric_limits<float>::quiet_NaN()) == 0);
}

TEST_CASE("fast encoders give code 0 for every NaN bit pattern") {
  const Encoder4 nf4 = host_encoder(QuantType::NF4);
  const Encoder4 fp4 = host_encoder(QuantType::FP4);
  for (uint32_t u : {0x7FC00000u, 0xFFC00000u, 0x7FFFFFFFu, 0xFFFFFFFFu, 0x7F800001u}) {
    float f;
    std::memcpy(&f, &u, sizeof(f));
    REQUIRE(encode_4bit(QuantType::NF4, nf4, f) == 0);
    REQUIRE(encode_4bit(QuantType::FP4, fp4, f) == 0);
  }
}

TEST_CASE("inverse_scale: a tiny absmax is scaled up first, every other one is 1/absmax exactly") {
  for (float am : {1.0f, 0.5f, 1.0e-19f, 123.0f, 3.0e38f}) {
    const InverseScale s = inverse_scale(am);
    for (float v : {am, -am * 0.3f, 0.0f}) REQUIRE(s(v) == v * (1.0f / am));
  }
  REQUIRE(inverse_scale(1e-45f)(1e-45f) == 1.0f);  // the smallest subnormal
  for (float am : {1e-39f, 2.9e-39f, 1e-30f, 3.0e-20f}) {
    const InverseScale s = inverse_scale(am);
    REQUIRE(std::isfinite(s.inv));
    REQUIRE(s(0.0f) == 0.0f);
    REQUIRE(std::fabs(s(am) - 1.0f) <= 1e-6f);
    REQUIRE(std::fabs(s(-am * 0.5f) + 0.5f) <= 1e-6f);
  }
  REQUIRE(inverse_scale(0.0f)(5.0f) == 0.0f);
  REQUIRE(inverse_scale(std::numeric_limits<float>::quiet_NaN())(5.0f) == 0.0f);
}
