#pragma once
// CUDA kernels of the quantize family. Element math comes from core/ so the
// codes equal the CPU reference's byte for byte.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "core/codebook.h"

namespace lowbit {
namespace cuda {

using core::QuantType;

// The encoders' cell tables (core::EncoderTables, built at compile time) in
// constant memory; each block copies its quant type's tables (33 or 17
// cells) into shared memory, where the lanes' scattered lookups fall into
// distinct banks or broadcast.
static __constant__ core::EncoderTables kEncoderTablesDev = core::EncoderTables();

template <QuantType QT>
struct SharedEncoder {
  static constexpr int kUsed = QT == QuantType::NF4 ? 33 : 17;
  uint8_t code[core::kCells];
  float thr[core::kCells];

  __device__ __forceinline__ void load() {
    const uint8_t* c = QT == QuantType::NF4 ? kEncoderTablesDev.nf4_code : kEncoderTablesDev.fp4_code;
    const float* t = QT == QuantType::NF4 ? kEncoderTablesDev.nf4_thr : kEncoderTablesDev.fp4_thr;
    if (threadIdx.x < kUsed) {
      code[threadIdx.x] = c[threadIdx.x];
      thr[threadIdx.x] = t[threadIdx.x];
    }
    __syncthreads();
  }
  __device__ __forceinline__ core::Encoder4 view() const { return core::Encoder4{code, thr}; }
};

// Packs the codes of 8 scaled values: element 2j in the high nibble of byte j.
template <QuantType QT>
__device__ __forceinline__ uint32_t encode8(const core::Encoder4& enc, const float v[8],
                                             const core::InverseScale& inv) {
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t hi = core::encode_4bit(QT, enc, inv(v[2 * j]));
    const uint32_t lo = core::encode_4bit(QT, enc, inv(v[2 * j + 1]));
    word |= ((hi << 4) | lo) << (8 * j);
  }
  return word;
}

// Writes the 4 packed bytes of elements [base, base+8); bytes at or past
// nbytes are dropped. Elements past n were loaded as 0 and so already carry
// the padding code of 0.0.
__device__ __forceinline__ void store_packed4(uint8_t* __restrict__ packed, int64_t base, int64_t nbytes,
                                             uint32_t word) {
  const int64_t b = base / 2;
  if (b + 4 <= nbytes) {
    *reinterpret_cast<uint32_t*>(packed + b) = word;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (b + k < nbytes) packed[b + k] = static_cast<uint8_t>(word >> (8 * k));
  }
}

// Block sizes up to 256: the tensor is cut into chunks of 8 elements (one
// 16-byte load for 16-bit inputs). Lane l of a warp takes chunks
// warp_base + 32*j + l for j < kQuantChunks, so its loads are all in flight
// before the first reduction and every warp access is contiguous. The BS/8
// chunks of a quantization block sit on consecutive lanes of one j and reduce
// their absmax with shuffles.
constexpr int kQuantChunks = 2;

template <typename T, QuantType QT, int BS>
__global__ void __launch_bounds__(256) quantize_4bit_small_kernel(const T* __restrict__ x, int64_t n, bool vec,
                                                                   uint8_t* __restrict__ packed,
                                                                   float* __restrict__ absmax) {
  static_assert(BS % 8 == 0 && BS / 8 <= 32, "block must fit one warp");
  constexpr int TPB = BS / 8;
  __shared__ SharedEncoder<QT> shared_enc;
  shared_enc.load();
  const core::Encoder4 enc = shared_enc.view();
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = (tid / 32) * (32 * kQuantChunks) + (tid % 32);
  float v[kQuantChunks][8];
#pragma unroll
  for (int j = 0; j < kQuantChunks; ++j) load_n<8>(x, (first + 32 * j) * 8, n, vec, v[j]);
  const int64_t nbytes = (n + 1) / 2;
#pragma unroll
  for (int j = 0; j < kQuantChunks; ++j) {
    const int64_t base = (first + 32 * j) * 8;
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) m = core::absmax_combine(m, core::absmax_term(v[j][k]));
#pragma unroll
    for (int off = TPB / 2; off > 0; off >>= 1) m = core::absmax_combine(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float am = core::absmax_finish(m);
    if (base < n) {
      if ((threadIdx.x % TPB) == 0) absmax[base / BS] = am;
      store_packed4(packed, base, nbytes, encode8<QT>(enc, v[j], core::inverse_scale(am)));
    }
  }
}

// Block sizes from 512: one warp per quantization block, two passes (the
// second re-reads the block, which is still in L1/L2).
template <typename T, QuantType QT, int BS>
__global__ void __launch_bounds__(256) quantize_4bit_large_kernel(const T* __restrict__ x, int64_t n, bool vec,
                                                                   int64_t nblocks, uint8_t* __restrict__ packed,
                                                                   float* __restrict__ absmax) {
  constexpr int CHUNKS = BS / 256;  // 8-element chunks per lane
  __shared__ SharedEncoder<QT> shared_enc;
  shared_enc.load();
  const core::Encoder4 enc = shared_enc.view();
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (block >= nblocks) return;
  const int64_t start = block * BS;
  float m = 0.0f;
  float v[8];
  for (int c = 0; c < CHUNKS; ++c) {
    load_n<8>(x, start + (c * 32 + lane) * 8, n, vec, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = core::absmax_combine(m, core::absmax_term(v[j]));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = core::absmax_combine(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float am = core::absmax_finish(m);
  if (lane == 0) absmax[block] = am;
  const core::InverseScale inv = core::inverse_scale(am);
  const int64_t nbytes = (n + 1) / 2;
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t base = start + (c * 32 + lane) * 8;
    if (base >= n) break;
    load_n<8>(x, base, n, vec, v);
    store_packed4(packed, base, nbytes, encode8<QT>(enc, v, inv));
  }
}

// Per-block scale of a 4-bit weight, plain or double-quantized. The nested
// product is rounded before the offset is added (__fmul_rn forbids a fused
// multiply-add), matching the CPU reference and bnb.
struct ScaleArgs {
  const float* absmax;         // plain scales, or nullptr
  const uint8_t* absmax_q;     // nested: 8-bit codes
  const float* nested_absmax;  // nested: float32 per nested block
  const float* nested_code;    // nested: 256-entry map
  const float* offset;         // nested: one float
  int nested_shift;            // log2(nested_blocksize)
};

template <bool NESTED>
__device__ __forceinline__ float load_scale(const ScaleArgs& s, int64_t block) {
  if constexpr (NESTED) {
    const float prod = __fmul_rn(__ldg(s.nested_code + s.absmax_q[block]), __ldg(s.nested_absmax + (block >> s.nested_shift)));
    return prod + __ldg(s.offset);
  } else {
    return __ldg(s.absmax + block);
  }
}

// Dequantize: the tensor is cut into chunks of 8 elements (4 packed bytes,
// 16 output bytes in 16-bit types). Lane l of a warp takes chunks
// warp_base + 32*j + l for j < kDequantChunks, so every load and store
// instruction of the warp is contiguous, and a thread has all its loads in
// flight before it decodes. blocksize >= 32: a chunk never straddles blocks.
constexpr int kDequantChunks = 4;

template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(256) dequantize_4bit_kernel(const uint8_t* __restrict__ packed, int64_t n,
                                                              bool vec_in, bool vec_out,
                                                              const float* __restrict__ code, ScaleArgs s,
                                                              int block_shift, OutT* __restrict__ out) {
  __shared__ float cb[16];
  if (threadIdx.x < 16) cb[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = (tid / 32) * (32 * kDequantChunks) + (tid % 32);
  const int64_t full_chunks = n / 8;
  uint32_t words[kDequantChunks];
#pragma unroll
  for (int j = 0; j < kDequantChunks; ++j) {
    const int64_t c = first + 32 * j;
    words[j] = (vec_in && c < full_chunks) ? __ldg(reinterpret_cast<const uint32_t*>(packed) + c) : 0u;
  }
#pragma unroll
  for (int j = 0; j < kDequantChunks; ++j) {
    const int64_t base = (first + 32 * j) * 8;
    if (base >= n) break;
    const float scale = load_scale<NESTED>(s, base >> block_shift);
    float v[8];
    if (vec_in && base + 8 <= n) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t byte = (words[j] >> (8 * k)) & 0xFF;
        v[2 * k] = cb[byte >> 4] * scale;
        v[2 * k + 1] = cb[byte & 0xF] * scale;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int64_t i = base + k;
        const uint8_t byte = i < n ? packed[i / 2] : 0;
        v[k] = cb[(i & 1) ? (byte & 0xF) : (byte >> 4)] * scale;
      }
    }
    store_n<8>(out, base, n, vec_out, v);
  }
}

// Blockwise 8-bit quantization: one warp per block, lanes stride through it
// (coalesced), two passes. The code lives in shared memory.
template <typename T>
__global__ void __launch_bounds__(256) quantize_8bit_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize,
                                                            int64_t nblocks, const float* __restrict__ code,
                                                            uint8_t* __restrict__ out, float* __restrict__ absmax) {
  __shared__ float cb[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) cb[i] = code[i];
  __syncthreads();
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (block >= nblocks) return;
  const int64_t start = block * blocksize;
  const int64_t end = min(start + blocksize, n);
  float m = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) m = core::absmax_combine(m, core::absmax_term(to_float(x[i])));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = core::absmax_combine(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float am = core::absmax_finish(m);
  if (lane == 0) absmax[block] = am;
  const core::InverseScale inv = core::inverse_scale(am);
  for (int64_t i = start + lane; i < end; i += 32) out[i] = core::encode_8bit(cb, inv(to_float(x[i])));
}

template <typename OutT>
__global__ void __launch_bounds__(256) dequantize_8bit_kernel(const uint8_t* __restrict__ q, int64_t n,
                                                              int block_shift, const float* __restrict__ absmax,
                                                              const float* __restrict__ code, OutT* __restrict__ out) {
  __shared__ float cb[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) cb[i] = code[i];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = from_float<OutT>(cb[q[i]] * __ldg(absmax + (i >> block_shift)));
}

}  // namespace cuda
}  // namespace lowbit
