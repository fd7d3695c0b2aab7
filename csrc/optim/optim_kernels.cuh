#pragma once
// Multi-tensor AdamW kernel with blockwise 8-bit (or float32) states.
//
// One launch covers up to kMaxTensors parameters of one dtype: their pointers
// travel in the kernel-argument struct (no metadata copy to the device, so no
// host synchronization and the launch is capturable in a CUDA graph). Each
// thread block takes one chunk of kChunk elements of one tensor; inside an
// 8-bit chunk each warp owns whole 256-element absmax blocks (8 elements per
// lane, vector loads), so the block absmax is a warp shuffle reduction.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "core/adamw8bit.h"

namespace lowbit {
namespace cuda {

constexpr int kAdamThreads = 256;
constexpr int kAdamWarps = kAdamThreads / 32;
constexpr int kBlocksPerWarp = 4;  // 256-element blocks per warp per chunk
constexpr int64_t kChunk = int64_t{kAdamWarps} * kBlocksPerWarp * core::kAdamBlock;  // 8192
// Keeps the argument struct under the classic 4 KiB kernel-parameter limit.
constexpr int kMaxTensors = 48;

enum : uint8_t { kEightBit = 1, kVecParam = 2, kVecState = 4 };

struct AdamTensorList {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* s1[kMaxTensors];
  void* s2[kMaxTensors];
  float* a1[kMaxTensors];
  float* a2[kMaxTensors];
  const float* step[kMaxTensors];
  int64_t n[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];  // prefix sum of chunks per tensor
  uint8_t flags[kMaxTensors];
  int32_t count;
};

struct AdamArgs {
  const float* code1;  // signed map (m)
  const float* code2;  // unsigned map (v)
  const float* lr_ptr;  // device lr, or nullptr to use lr_value
  float lr_value;
  double beta1, beta2, eps, weight_decay;
};

// The 256-entry maps live in shared memory with one padding word after every
// 32 entries: the probes of one level of the binary search (entries spaced by
// a power of two) then fall into different banks instead of the same one.
__device__ __forceinline__ int skew(int i) { return i + (i >> 5); }
constexpr int kSkewedSize = 256 + 256 / 32;

// Same result as core::encode_8bit (nearest entry, ties to the lower one,
// NaN and values below the first entry to 0), reading the skewed tables;
// `mid` holds the float32 midpoints (code[i] + code[i+1]) * 0.5f.
__device__ __forceinline__ uint8_t encode_8bit_smem(const float* code, const float* mid, float x) {
  int lo = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) {
    const int probe = lo + step;
    if (code[skew(probe)] <= x) lo = probe;
  }
  if (lo == 255) return 255;
  if (lo == 0 && !(code[0] <= x)) return 0;
  return static_cast<uint8_t>(x > mid[skew(lo)] ? lo + 1 : lo);
}

__device__ __forceinline__ void load8_u8(const uint8_t* __restrict__ q, int64_t base, int64_t n, bool vec,
                                         uint8_t out[8]) {
  if (vec && base + 8 <= n) {
    const uint2 w = *reinterpret_cast<const uint2*>(q + base);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[j] = static_cast<uint8_t>(w.x >> (8 * j));
      out[4 + j] = static_cast<uint8_t>(w.y >> (8 * j));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = (base + j < n) ? q[base + j] : 0;
  }
}

__device__ __forceinline__ void store8_u8(uint8_t* __restrict__ q, int64_t base, int64_t n, bool vec,
                                          const uint8_t v[8]) {
  if (vec && base + 8 <= n) {
    uint2 w;
    w.x = v[0] | (v[1] << 8) | (v[2] << 16) | (static_cast<uint32_t>(v[3]) << 24);
    w.y = v[4] | (v[5] << 8) | (v[6] << 16) | (static_cast<uint32_t>(v[7]) << 24);
    *reinterpret_cast<uint2*>(q + base) = w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (base + j < n) q[base + j] = v[j];
  }
}

// At most 64 registers: four blocks (32 warps) per SM keep enough loads in flight.
template <typename T>
__global__ void __launch_bounds__(kAdamThreads, 4) adamw_multi_tensor_kernel(const AdamTensorList tl, const AdamArgs args) {
  __shared__ float s_code1[kSkewedSize], s_code2[kSkewedSize], s_mid1[kSkewedSize], s_mid2[kSkewedSize];

  // Which tensor this block works on: a short scan of the chunk prefix sums.
  int t = 0;
  while (t + 1 < tl.count && static_cast<int32_t>(blockIdx.x) >= tl.chunk_start[t + 1]) ++t;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - tl.chunk_start[t];
  const int64_t n = tl.n[t];
  const uint8_t flags = tl.flags[t];
  T* __restrict__ p = static_cast<T*>(tl.p[t]);
  const T* __restrict__ g = static_cast<const T*>(tl.g[t]);

  const float lr = args.lr_ptr != nullptr ? *args.lr_ptr : args.lr_value;
  const core::AdamWScalars s =
      core::make_scalars(lr, *tl.step[t], args.beta1, args.beta2, args.eps, args.weight_decay);

  if (!(flags & kEightBit)) {
    // float32 states: plain element-wise update of this chunk.
    float* __restrict__ m = static_cast<float*>(tl.s1[t]);
    float* __restrict__ v = static_cast<float*>(tl.s2[t]);
    const int64_t end = (chunk + 1) * kChunk < n ? (chunk + 1) * kChunk : n;
    for (int64_t i = chunk * kChunk + threadIdx.x; i < end; i += kAdamThreads) {
      float pf = to_float(p[i]), mf = m[i], vf = v[i];
      if (core::adamw_element(s, to_float(g[i]), pf, mf, vf)) {
        p[i] = from_float<T>(pf);
        m[i] = mf;
        v[i] = vf;
      }
    }
    return;
  }

  for (int i = threadIdx.x; i < 256; i += kAdamThreads) {
    const float c1 = args.code1[i], c2 = args.code2[i];
    s_code1[skew(i)] = c1;
    s_code2[skew(i)] = c2;
    // Midpoints exactly as core::encode_8bit computes them.
    s_mid1[skew(i)] = i < 255 ? __fmul_rn(__fadd_rn(c1, args.code1[i + 1]), 0.5f) : c1;
    s_mid2[skew(i)] = i < 255 ? __fmul_rn(__fadd_rn(c2, args.code2[i + 1]), 0.5f) : c2;
  }
  __syncthreads();

  uint8_t* __restrict__ q1 = static_cast<uint8_t*>(tl.s1[t]);
  uint8_t* __restrict__ q2 = static_cast<uint8_t*>(tl.s2[t]);
  float* __restrict__ a1 = tl.a1[t];
  float* __restrict__ a2 = tl.a2[t];
  const bool vec_p = flags & kVecParam;
  const bool vec_s = flags & kVecState;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

#pragma unroll 1
  for (int it = 0; it < kBlocksPerWarp; ++it) {
    // The warps of a block sweep consecutive 256-element blocks together.
    const int64_t qblock = chunk * (kAdamWarps * kBlocksPerWarp) + it * kAdamWarps + warp;
    const int64_t block_start = qblock * core::kAdamBlock;
    if (block_start >= n) break;
    const int64_t base = block_start + lane * 8;

    float pv[8], gv[8], mv[8], vv[8];
    uint8_t c1[8], c2[8];
    load8(p, base, n, vec_p, pv);
    load8(g, base, n, vec_p, gv);
    load8_u8(q1, base, n, vec_s, c1);
    load8_u8(q2, base, n, vec_s, c2);
    const float am1 = a1[qblock], am2 = a2[qblock];

    float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (base + j < n) {
        mv[j] = __fmul_rn(s_code1[skew(c1[j])], am1);
        vv[j] = __fmul_rn(s_code2[skew(c2[j])], am2);
        core::adamw_element(s, gv[j], pv[j], mv[j], vv[j]);
      } else {
        mv[j] = 0.0f;  // past the end: must not raise the block absmax
        vv[j] = 0.0f;
      }
      max1 = core::absmax_combine(max1, core::absmax_term(mv[j]));
      max2 = core::absmax_combine(max2, core::absmax_term(vv[j]));
    }
    // Every lane has read the old absmax before any lane passes the shuffles,
    // so lane 0 may overwrite it afterwards.
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      max1 = core::absmax_combine(max1, __shfl_xor_sync(0xffffffffu, max1, off));
      max2 = core::absmax_combine(max2, __shfl_xor_sync(0xffffffffu, max2, off));
    }
    const float new1 = core::absmax_finish(max1), new2 = core::absmax_finish(max2);
    if (lane == 0) {
      a1[qblock] = new1;
      a2[qblock] = new2;
    }
    const float inv1 = core::inverse_scale(new1), inv2 = core::inverse_scale(new2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      c1[j] = encode_8bit_smem(s_code1, s_mid1, __fmul_rn(mv[j], inv1));
      c2[j] = encode_8bit_smem(s_code2, s_mid2, __fmul_rn(vv[j], inv2));
    }
    // A skipped (non-finite gradient) element stores its unchanged value back.
    store8(p, base, n, vec_p, pv);
    store8_u8(q1, base, n, vec_s, c1);
    store8_u8(q2, base, n, vec_s, c2);
  }
}

}  // namespace cuda
}  // namespace lowbit
