// Element and block math of the 8-bit AdamW step (csrc/core/adamw8bit.h).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/adamw8bit.h"
#include "core/dynamic_map.h"

using namespace lowbit::core;

namespace {

// Straightforward double-precision AdamW (torch.optim.AdamW's order).
void adamw_double(double lr, int t, double b1, double b2, double eps, double wd, double g, double& p, double& m,
                  double& v) {
  p *= 1.0 - lr * wd;
  m = b1 * m + (1.0 - b1) * g;
  v = b2 * v + (1.0 - b2) * g * g;
  const double bc1 = 1.0 - std::pow(b1, t), bc2 = 1.0 - std::pow(b2, t);
  p -= lr / bc1 * m / (std::sqrt(v) / std::sqrt(bc2) + eps);
}

}  // namespace

// Repeated squaring loses about log2(t) roundings of relative accuracy.
TEST_CASE("pow_int matches pow", "[adamw]") {
  for (double b : {0.0, 0.5, 0.9, 0.999, 0.9999}) {
    for (int64_t t : {0, 1, 2, 3, 10, 1000, 123457}) {
      const double want = std::pow(b, static_cast<double>(t));
      CHECK(pow_int(b, t) == Approx(want).epsilon(1e-9).margin(1e-200));
    }
  }
}

TEST_CASE("scalars carry the bias corrections (SPEC section 8 form)", "[adamw]") {
  const AdamWScalars s = make_scalars(1e-3f, 10.0f, 0.9, 0.999, 1e-8, 0.01);
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(0.999, 10));
  CHECK(s.step_size == Approx(1e-3 * bc2_sqrt / (1.0 - std::pow(0.9, 10))).epsilon(1e-6));
  CHECK(s.eps_hat == Approx(1e-8 * bc2_sqrt).epsilon(1e-6));
  CHECK(s.decay == Approx(1.0 - 1e-3 * 0.01).epsilon(1e-7));
  CHECK(s.one_minus_beta1 == Approx(0.1).epsilon(1e-7));
  // a step of 0 is treated as 1, never a division by zero
  const AdamWScalars z = make_scalars(1e-3f, 0.0f, 0.9, 0.999, 1e-8, 0.0);
  CHECK(std::isfinite(z.step_size));
  CHECK(z.step_size == make_scalars(1e-3f, 1.0f, 0.9, 0.999, 1e-8, 0.0).step_size);
}

TEST_CASE("element update equals double-precision AdamW", "[adamw]") {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int t = 1; t <= 20; ++t) {
    const AdamWScalars s = make_scalars(2e-3f, static_cast<float>(t), 0.9, 0.99, 1e-6, 0.1);
    for (int k = 0; k < 200; ++k) {
      const float g = normal(rng) * 0.1f;
      float p = normal(rng), m = normal(rng) * 0.01f, v = std::fabs(normal(rng)) * 1e-3f;
      double pd = p, md = m, vd = v;
      REQUIRE(adamw_element(s, g, p, m, v));
      adamw_double(static_cast<double>(2e-3f), t, 0.9, 0.99, 1e-6, 0.1, g, pd, md, vd);
      CHECK(m == Approx(md).epsilon(1e-5).margin(1e-9));
      CHECK(v == Approx(vd).epsilon(1e-5).margin(1e-12));
      CHECK(p == Approx(pd).epsilon(1e-5).margin(1e-7));
    }
  }
}

TEST_CASE("weight decay is applied before the update", "[adamw]") {
  // With m = v = 0 and g = 0 the Adam term is 0: only the decay moves p.
  const AdamWScalars s = make_scalars(0.1f, 1.0f, 0.9, 0.999, 1e-8, 0.5);
  float p = 2.0f, m = 0.0f, v = 0.0f;
  REQUIRE(adamw_element(s, 0.0f, p, m, v));
  CHECK(p == Approx(2.0 * (1.0 - 0.1 * 0.5)).epsilon(1e-6));
  CHECK(m == 0.0f);
  CHECK(v == 0.0f);
}

TEST_CASE("a non-finite gradient leaves the element untouched", "[adamw]") {
  const AdamWScalars s = make_scalars(1e-2f, 3.0f, 0.9, 0.999, 1e-8, 0.1);
  for (float g : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    float p = 0.75f, m = -0.125f, v = 0.0625f;
    CHECK_FALSE(adamw_element(s, g, p, m, v));
    CHECK(p == 0.75f);
    CHECK(m == -0.125f);
    CHECK(v == 0.0625f);
  }
}

TEST_CASE("8-bit block: absmax, nearest codes and the element math", "[adamw]") {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> code(0, 255);
  const int count = 200;  // a partial last block
  std::vector<float> p(count), g(count);
  std::vector<uint8_t> q1(count), q2(count);
  for (int i = 0; i < count; ++i) {
    p[i] = normal(rng);
    g[i] = normal(rng) * 0.05f;
    q1[i] = static_cast<uint8_t>(code(rng));
    q2[i] = static_cast<uint8_t>(code(rng));
  }
  g[7] = std::numeric_limits<float>::quiet_NaN();
  float a1 = 0.02f, a2 = 0.001f;
  const AdamWScalars s = make_scalars(1e-3f, 5.0f, 0.9, 0.999, 1e-8, 0.01);

  // Expected: per element, the float math on the dequantized states.
  std::vector<float> pw(p), mw(count), vw(count);
  float max1 = 0.0f, max2 = 0.0f;
  for (int i = 0; i < count; ++i) {
    mw[i] = kDynamicMapSigned[q1[i]] * a1;
    vw[i] = kDynamicMapUnsigned[q2[i]] * a2;
    adamw_element(s, g[i], pw[i], mw[i], vw[i]);
    max1 = std::max(max1, std::fabs(mw[i]));
    max2 = std::max(max2, std::fabs(vw[i]));
  }
  const float p7 = p[7];

  adamw8bit_block(s, kDynamicMapSigned, kDynamicMapUnsigned, p.data(), g.data(), q1.data(), q2.data(), &a1, &a2,
                  count);
  CHECK(a1 == max1);
  CHECK(a2 == max2);
  CHECK(p[7] == p7);
  for (int i = 0; i < count; ++i) {
    CHECK(p[i] == pw[i]);
    CHECK(q1[i] == encode_8bit(kDynamicMapSigned, mw[i] * (1.0f / a1)));
    CHECK(q2[i] == encode_8bit(kDynamicMapUnsigned, vw[i] * (1.0f / a2)));
    // nearest entry: no other entry is closer to the scaled value
    const float x = mw[i] * (1.0f / a1);
    const float err = std::fabs(kDynamicMapSigned[q1[i]] - x);
    for (int c = 0; c < 256; ++c) CHECK(std::fabs(kDynamicMapSigned[c] - x) >= err);
  }
}

TEST_CASE("an all-zero block stays zero", "[adamw]") {
  std::vector<float> p(256, 1.0f), g(256, 0.0f);
  std::vector<uint8_t> q1(256, 127), q2(256, 0);  // the codes of 0.0
  float a1 = 0.0f, a2 = 0.0f;
  const AdamWScalars s = make_scalars(1e-3f, 1.0f, 0.9, 0.999, 1e-8, 0.0);
  adamw8bit_block(s, kDynamicMapSigned, kDynamicMapUnsigned, p.data(), g.data(), q1.data(), q2.data(), &a1, &a2,
                  256);
  CHECK(a1 == 0.0f);
  CHECK(a2 == 0.0f);
  for (int i = 0; i < 256; ++i) {
    CHECK(q1[i] == 127);
    CHECK(q2[i] == 0);
    CHECK(p[i] == 1.0f);
  }
}

TEST_CASE("float32-state range matches the element function", "[adamw]") {
  const AdamWScalars s = make_scalars(1e-2f, 2.0f, 0.8, 0.95, 1e-5, 0.2);
  std::vector<float> p = {0.5f, -1.0f, 2.0f}, g = {0.1f, std::numeric_limits<float>::infinity(), -0.3f};
  std::vector<float> m = {0.01f, 0.02f, -0.03f}, v = {1e-3f, 2e-3f, 3e-3f};
  std::vector<float> pw(p), mw(m), vw(v);
  for (int i = 0; i < 3; ++i) adamw_element(s, g[i], pw[i], mw[i], vw[i]);
  adamw32_range(s, p.data(), g.data(), m.data(), v.data(), 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(p[i] == pw[i]);
    CHECK(m[i] == mw[i]);
    CHECK(v[i] == vw[i]);
  }
  CHECK(p[1] == -1.0f);
}

TEST_CASE("the cell-table 8-bit encoder equals the binary search", "[adamw]") {
  for (const float* code : {kDynamicMapSigned, kDynamicMapUnsigned}) {
    std::vector<uint8_t> count(kMapCells);
    float mid[256];
    REQUIRE(build_map_cells(code, count.data(), mid));
    auto check = [&](float x) {
      INFO("x = " << x);
      REQUIRE(encode_8bit_cells(count.data(), mid, x) == encode_8bit(code, x));
    };
    // Every entry and midpoint and the floats around them.
    for (int i = 0; i < 256; ++i) {
      for (float c : {code[i], i < 255 ? map_midpoint(code, i) : code[i]}) {
        float lo = c, hi = c;
        for (int k = 0; k < 6; ++k, lo = std::nextafter(lo, -2.0f), hi = std::nextafter(hi, 2.0f)) {
          check(lo);
          check(hi);
          check(-lo);
        }
      }
    }
    // Cell edges: every binade boundary and 7-bit mantissa step, both signs.
    for (int e = 100; e <= 128; ++e)
      for (uint32_t m = 0; m < 128; ++m) {
        const uint32_t bits = (static_cast<uint32_t>(e) << 23) | (m << 16);
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        for (float v : {f, std::nextafter(f, 0.0f), std::nextafter(f, 4.0f)}) {
          check(v);
          check(-v);
        }
      }
    std::mt19937 rng(7);
    std::uniform_int_distribution<uint32_t> bits;
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    for (int i = 0; i < 500000; ++i) {
      uint32_t u = bits(rng);
      float f;
      std::memcpy(&f, &u, sizeof(f));
      if (!std::isnan(f)) check(f);
      const float w = unit(rng);
      check(w);
      check(w * w * w * w);  // many small magnitudes, as v / absmax gives
    }
    const float inf = std::numeric_limits<float>::infinity();
    for (float v : {0.0f, -0.0f, 1.0f, -1.0f, 1.5f, -1.5f, 1e-30f, -1e-30f, 5e-39f, inf, -inf}) check(v);
    REQUIRE(encode_8bit_cells(count.data(), mid, std::numeric_limits<float>::quiet_NaN()) == 0);
  }
}

TEST_CASE("maps the cell table cannot serve are refused", "[adamw]") {
  std::vector<uint8_t> count(kMapCells);
  float mid[256];
  float code[256];
  for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * i / 255.0f;
  REQUIRE(build_map_cells(code, count.data(), mid));  // linear, 0.0078 apart: one per cell
  code[10] = code[9];                                   // not strictly ascending
  REQUIRE_FALSE(build_map_cells(code, count.data(), mid));
  for (int i = 0; i < 256; ++i) code[i] = 0.9f + 0.1f * i / 255.0f;  // 256 entries within 0.1
  REQUIRE_FALSE(build_map_cells(code, count.data(), mid));
}
