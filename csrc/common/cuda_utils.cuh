#pragma once
// Small CUDA helpers: 8-wide loads of fp32/fp16/bf16 into float registers and
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

// Loads x[base .. base+8) as floats; elements at or past n read as 0.
// `vec` says the pointer is 16-byte aligned (base is a multiple of 8).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ x, int64_t base, int64_t n, bool vec, float v[8]) {
  if (vec && base + 8 <= n) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = *reinterpret_cast<const float4*>(x + base);
      const float4 b = *reinterpret_cast<const float4*>(x + base + 4);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      const uint4 r = *reinterpret_cast<const uint4*>(x + base);
      unpack2<T>(r.x, v[0], v[1]);
      unpack2<T>(r.y, v[2], v[3]);
      unpack2<T>(r.z, v[4], v[5]);
      unpack2<T>(r.w, v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (base + j < n) ? to_float(x[base + j]) : 0.0f;
  }
}

// Stores 8 floats to out[base .. base+8) (only the elements before n).
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ out, int64_t base, int64_t n, bool vec, const float v[8]) {
  if (vec && base + 8 <= n) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(out + base) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(out + base + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = from_float<T>(v[2 * j]).x;
        const uint32_t hi = from_float<T>(v[2 * j + 1]).x;
        w[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(out + base) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (base + j < n) out[base + j] = from_float<T>(v[j]);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace lowbit
