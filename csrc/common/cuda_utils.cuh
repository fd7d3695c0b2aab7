#pragma once
// Small CUDA helpers: 4- and 8-wide loads of fp32/fp16/bf16 into float registers and
// the matching stores, with a guarded scalar path for tails and unaligned views.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lowbit {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) { return __half2float(__ushort_as_half(v.x)); }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return __uint_as_float(static_cast<uint32_t>(v.x) << 16); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ c10::Half from_float<c10::Half>(float v) {
  c10::Half h;
  h.x = __half_as_ushort(__float2half_rn(v));
  return h;
}
template <>
__device__ __forceinline__ c10::BFloat16 from_float<c10::BFloat16>(float v) {
  c10::BFloat16 b;
  b.x = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  return b;
}

// Two 16-bit values packed in a word -> floats.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& a, float& b);
template <>
__device__ __forceinline__ void unpack2<c10::BFloat16>(uint32_t w, float& a, float& b) {
  a = __uint_as_float(w << 16);
  b = __uint_as_float(w & 0xFFFF0000u);
}
template <>
__device__ __forceinline__ void unpack2<c10::Half>(uint32_t w, float& a, float& b) {
  a = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFF)));
  b = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// N (4 or 8) consecutive elements x[base .. base+N) as floats; elements at or
// past n read as 0. `vec` says the access may be vectorized: x + base is
// aligned to the vector (4 * N bytes for float, 2 * N for 16-bit types).
// IN_RANGE: the caller guarantees `vec` and base + N <= n (no checks emitted).
template <int N, bool IN_RANGE = false, typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ x, int64_t base, int64_t n, bool vec, float v[N]) {
  static_assert(N == 4 || N == 8, "4 or 8 elements");
  if (IN_RANGE || (vec && base + N <= n)) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int h = 0; h < N / 4; ++h) {
        const float4 a = *reinterpret_cast<const float4*>(x + base + 4 * h);
        v[4 * h] = a.x, v[4 * h + 1] = a.y, v[4 * h + 2] = a.z, v[4 * h + 3] = a.w;
      }
    } else if constexpr (N == 8) {
      const uint4 r = *reinterpret_cast<const uint4*>(x + base);
      unpack2<T>(r.x, v[0], v[1]);
      unpack2<T>(r.y, v[2], v[3]);
      unpack2<T>(r.z, v[4], v[5]);
      unpack2<T>(r.w, v[6], v[7]);
    } else {
      const uint2 r = *reinterpret_cast<const uint2*>(x + base);
      unpack2<T>(r.x, v[0], v[1]);
      unpack2<T>(r.y, v[2], v[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = (base + j < n) ? to_float(x[base + j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return static_cast<uint32_t>(from_float<T>(a).x) | (static_cast<uint32_t>(from_float<T>(b).x) << 16);
}

// Stores N (4 or 8) floats to out[base .. base+N) (only the elements before n).
// IN_RANGE as for load_n.
template <int N, bool IN_RANGE = false, typename T>
__device__ __forceinline__ void store_n(T* __restrict__ out, int64_t base, int64_t n, bool vec, const float v[N]) {
  static_assert(N == 4 || N == 8, "4 or 8 elements");
  if (IN_RANGE || (vec && base + N <= n)) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int h = 0; h < N / 4; ++h)
        *reinterpret_cast<float4*>(out + base + 4 * h) =
            make_float4(v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
    } else if constexpr (N == 8) {
      *reinterpret_cast<uint4*>(out + base) =
          make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
    } else {
      *reinterpret_cast<uint2*>(out + base) = make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (base + j < n) out[base + j] = from_float<T>(v[j]);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace lowbit
