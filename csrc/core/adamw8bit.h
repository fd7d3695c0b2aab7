#pragma once
// Torch-free math of one AdamW step with blockwise 8-bit states (SPEC section
// 8), shared by the CPU op, the CUDA kernel and the Catch2 tests.
//
// Conventions (the optimizer's documented behaviour):
//  * Weight decay is decoupled and applied BEFORE the Adam update, as
//    torch.optim.AdamW does:  p = p * (1 - lr*wd), then the Adam update.
//  * Bias correction and eps in SPEC section 8's form (bnb's):
//      bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t,
//      p = p - (lr*sqrt(bc2)/bc1) * m / (sqrt(v) + eps*sqrt(bc2)),
//    algebraically torch.optim.AdamW's (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
//    but with one division per element instead of two: the two per-step
//    factors are computed once, in double, and rounded to float. The result
//    differs from torch's float32 arithmetic by a few roundings at most.
//  * m = beta1*m + (1-beta1)*g,  v = beta2*v + (1-beta2)*g*g.
//  * A non-finite gradient element (NaN or +-inf) leaves its parameter, m and v
//    untouched (no decay either); its m and v are re-encoded with the block's
//    new absmax like every other element of the block. bnb instead zeroes the
//    element's states; keeping them loses nothing when a loss spike produces
//    an occasional inf.
//  * The new block absmax is max|m| (max|v|) over the block after the update;
//    m is encoded with the signed map, v with the unsigned map, each to the
//    nearest entry (core::encode_8bit).
//
// Every float operation goes through the exactly-rounded helpers below so the
// CUDA compiler cannot fuse a multiply and an add: CPU and CUDA then produce
// the same parameters and the same codes, bit for bit. (The host build has no
// FMA contraction: setup.py compiles for baseline x86-64 without -mfma.)
#include <cstdint>

#include "core/codebook.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace lowbit {
namespace core {

constexpr int kAdamBlock = 256;  // elements per absmax of an 8-bit state

LOWBIT_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LOWBIT_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LOWBIT_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LOWBIT_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LOWBIT_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
LOWBIT_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
LOWBIT_HD double dsqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// b^t for an integer t >= 0 by repeated squaring in double: only exactly
// rounded multiplies, so host and device agree (powf/pow do not promise that).
LOWBIT_HD double pow_int(double b, int64_t t) {
  double result = 1.0;
  while (t > 0) {
    if (t & 1) result = dmul(result, b);
    b = dmul(b, b);
    t >>= 1;
  }
  return result;
}

// Per-step scalars of one parameter, all float32 as the element math uses them.
struct AdamWScalars {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float eps_hat;    // eps * sqrt(1 - beta2^t)
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t)
};

// `step` is the count including the step being taken (1 on the first update).
// A step below 1 is treated as 1, so a mistaken 0 cannot divide by zero.
LOWBIT_HD AdamWScalars make_scalars(float lr, float step, double beta1, double beta2, double eps,
                                    double weight_decay) {
  int64_t t = static_cast<int64_t>(step);
  if (t < 1) t = 1;
  const double dlr = static_cast<double>(lr);
  AdamWScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bc2_sqrt = dsqrt(1.0 - pow_int(beta2, t));
  s.eps_hat = static_cast<float>(dmul(eps, bc2_sqrt));
  s.decay = static_cast<float>(1.0 - dmul(dlr, weight_decay));
  s.step_size = static_cast<float>(dmul(dlr, bc2_sqrt) / (1.0 - pow_int(beta1, t)));
  return s;
}

// The two halves of one element's update, so that a caller can compute the
// square root between them its own way (the CUDA kernel batches the slow
// path of sqrt.rn). adamw_element below is the whole update.
LOWBIT_HD void adamw_moments(const AdamWScalars& s, float g, float& m, float& v) {
  m = fadd(fmul(s.beta1, m), fmul(s.one_minus_beta1, g));
  v = fadd(fmul(s.beta2, v), fmul(s.one_minus_beta2, fmul(g, g)));
}
// The parameter after decay and update, given m and sqrt(v) (exactly rounded).
LOWBIT_HD float adamw_param(const AdamWScalars& s, float p, float m, float sqrt_v) {
  const float denom = fadd(sqrt_v, s.eps_hat);
  return fsub(fmul(p, s.decay), fmul(s.step_size, fdiv(m, denom)));
}

// One element. Returns false (and changes nothing) for a non-finite gradient.
LOWBIT_HD bool adamw_element(const AdamWScalars& s, float g, float& p, float& m, float& v) {
  if (!is_finite(g)) return false;
  adamw_moments(s, g, m, v);
  p = adamw_param(s, p, m, fsqrt(v));
  return true;
}

// Dequantized state value: map entry times the block absmax.
LOWBIT_HD float dequant_8bit(const float* code, uint8_t q, float absmax) { return fmul(code[q], absmax); }

// Host reference of one 8-bit block (count <= kAdamBlock elements). T is the
// parameter/gradient type (float, c10::Half, c10::BFloat16 or anything with
// float conversions). code1 is the signed map of m, code2 the unsigned map of v.
template <typename T>
void adamw8bit_block(const AdamWScalars& s, const float* code1, const float* code2, T* p, const T* g, uint8_t* q1,
                     uint8_t* q2, float* absmax1, float* absmax2, int count) {
  float m[kAdamBlock], v[kAdamBlock];
  const float am1 = *absmax1, am2 = *absmax2;
  float max1 = 0.0f, max2 = 0.0f;
  for (int i = 0; i < count; ++i) {
    m[i] = dequant_8bit(code1, q1[i], am1);
    v[i] = dequant_8bit(code2, q2[i], am2);
    float pf = static_cast<float>(p[i]);
    if (adamw_element(s, static_cast<float>(g[i]), pf, m[i], v[i])) p[i] = static_cast<T>(pf);
    max1 = absmax_combine(max1, absmax_term(m[i]));
    max2 = absmax_combine(max2, absmax_term(v[i]));
  }
  const float new1 = absmax_finish(max1), new2 = absmax_finish(max2);
  *absmax1 = new1;
  *absmax2 = new2;
  const InverseScale inv1 = inverse_scale(new1), inv2 = inverse_scale(new2);
  for (int i = 0; i < count; ++i) {
    q1[i] = encode_8bit(code1, inv1(m[i]));
    q2[i] = encode_8bit(code2, inv2(v[i]));
  }
}

// Host reference of float32 states (small parameters), elements [0, count).
template <typename T>
void adamw32_range(const AdamWScalars& s, T* p, const T* g, float* m, float* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    float pf = static_cast<float>(p[i]);
    if (adamw_element(s, static_cast<float>(g[i]), pf, m[i], v[i])) p[i] = static_cast<T>(pf);
  }
}

}  // namespace core
}  // namespace lowbit
