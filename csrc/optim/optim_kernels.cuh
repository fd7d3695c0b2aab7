#pragma once
// Multi-tensor AdamW kernel with blockwise 8-bit (or float32) states.
//
// One launch covers up to kMaxTensors parameters of one dtype: their pointers
// travel in the kernel-argument struct (no metadata copy to the device, so no
// host synchronization and the launch is capturable in a CUDA graph). Each
// thread block takes one chunk of kChunk elements of one tensor; inside an
// 8-bit chunk each warp owns whole 256-element absmax blocks (4 + 4 elements
// per lane, coalesced vector loads), so the block absmax is a warp shuffle
// reduction.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "core/adamw8bit.h"

namespace lowbit {
namespace cuda {

constexpr int kAdamThreads = 256;
constexpr int kAdamWarps = kAdamThreads / 32;
constexpr int kBlocksPerWarp = 8;  // 256-element blocks per warp per chunk
constexpr int64_t kChunk = int64_t{kAdamWarps} * kBlocksPerWarp * core::kAdamBlock;  // 16384
// Parameters per launch. CUDA 12.1 raised the kernel-parameter limit from
// 4 KiB to 32764 bytes (Volta and newer; lowbit builds for sm_80+): 448
// tensors cover the LoRA adapters of a 7B model (7 projections x 32 layers x
// A and B) in one launch, and a 256-tensor full fine-tuning step in one
// launch instead of six. The structs are passed as __grid_constant__, so the
// kernel reads them in place from the constant bank, however it indexes them.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxParamBytes = 32764;
constexpr int kMaxTensors = 448;
#else
constexpr int kMaxParamBytes = 4096;
constexpr int kMaxTensors = 48;
#endif

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
  int prefetch;  // 256-element blocks a warp asks L2 for ahead of use (0: none; sm_90)
};

static_assert(sizeof(AdamTensorList) + sizeof(AdamArgs) + sizeof(const uint8_t*) <= kMaxParamBytes,
              "adamw_multi_tensor_kernel's arguments exceed the kernel-parameter limit");

// The step counts the prologue kernel increments, kMaxSteps per launch.
constexpr int kMaxSteps = (kMaxParamBytes - 64) / 8 - 1;
struct AdamStepList {
  float* step[kMaxSteps];
  int32_t count;
};
static_assert(sizeof(AdamStepList) + 3 * sizeof(void*) <= kMaxParamBytes,
              "adam_prologue_kernel's arguments exceed the kernel-parameter limit");

// The 8-bit encode uses the cell tables of core::build_map_cells (one byte
// and one float lookup per element instead of a binary search). A small
// kernel builds them for the maps of this call into a scratch buffer; each
// block of the update kernel copies them into shared memory. A map the
// tables cannot serve (see core::build_map_cells) leaves its flag at 0 and
// the update kernel falls back to the search.
constexpr int kCellBytes = (core::kMapCells + 15) / 16 * 16;
constexpr int kTableMidOffset = 2 * kCellBytes;                  // mid1, mid2: 256 floats each
constexpr int kTableFlagOffset = kTableMidOffset + 2 * 256 * 4;  // int32 per map: 1 = served by the table
constexpr int kTableBytes = kTableFlagOffset + 16;

// Block `map` (0: code1, 1: code2) of a 1024-thread launch builds that map's
// table; every entry of the buffer is written, so it needs no clearing.
__device__ __forceinline__ void build_map_cells(const float* __restrict__ code1, const float* __restrict__ code2,
                                                uint8_t* __restrict__ table, int map) {
  __shared__ float code[256];
  __shared__ uint32_t cells[256];
  const float* src = map == 0 ? code1 : code2;
  float* mid = reinterpret_cast<float*>(table + kTableMidOffset) + 256 * map;
  uint8_t* count = table + kCellBytes * map;
  const int i = threadIdx.x;
  if (i < 256) code[i] = src[i];
  __syncthreads();
  bool ok = true;
  if (i < 255) {
    const float m = core::map_midpoint_checked(code, i);
    ok = m == m;
    mid[i] = m;
    cells[i] = core::map_cell(ok ? m : 0.0f);
  } else if (i == 255) {
    mid[255] = __uint_as_float(0x7FC00000u);  // NaN: no value lies above it
  }
  __syncthreads();
  if (i > 0 && i < 255 && cells[i] <= cells[i - 1]) ok = false;
  const bool all_ok = __syncthreads_and(ok);
  // Through the padding too (entries no cell reaches): the update kernel copies whole 16-byte words.
  for (int o = i; o < kCellBytes; o += blockDim.x) count[o] = core::map_cell_count(cells, o);
  if (i == 0) reinterpret_cast<int*>(table + kTableFlagOffset)[map] = all_ok ? 1 : 0;
}

// Runs before the update kernels of a call, on the same stream: builds the
// encode tables (when `table` is set; 2 blocks of 1024 threads) and adds 1 to
// each listed step count. atomicAdd: a step tensor listed twice is counted
// twice, as torch._foreach_add_ would; either way the float addition is the
// same correctly rounded x + 1.
__global__ void __launch_bounds__(1024) adam_prologue_kernel(const float* __restrict__ code1,
                                                             const float* __restrict__ code2,
                                                             uint8_t* __restrict__ table,
                                                             const __grid_constant__ AdamStepList steps) {
  if (table != nullptr && blockIdx.x < 2) build_map_cells(code1, code2, table, blockIdx.x);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < steps.count; i += gridDim.x * blockDim.x)
    atomicAdd(steps.step[i], 1.0f);
}

// IN_RANGE: the caller guarantees `vec` and base + 4 <= n (no checks emitted).
template <bool IN_RANGE = false>
__device__ __forceinline__ uint32_t load4_u8(const uint8_t* __restrict__ q, int64_t base, int64_t n, bool vec) {
  if (IN_RANGE || (vec && base + 4 <= n)) return *reinterpret_cast<const uint32_t*>(q + base);
  uint32_t w = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (base + j < n) w |= static_cast<uint32_t>(q[base + j]) << (8 * j);
  return w;
}

template <bool IN_RANGE = false>
__device__ __forceinline__ void store4_u8(uint8_t* __restrict__ q, int64_t base, int64_t n, bool vec, uint32_t w) {
  if (IN_RANGE || (vec && base + 4 <= n)) {
    *reinterpret_cast<uint32_t*>(q + base) = w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (base + j < n) q[base + j] = static_cast<uint8_t>(w >> (8 * j));
  }
}

struct SharedMaps {
  uint8_t count1[kCellBytes], count2[kCellBytes];
  float code1[256], code2[256], mid1[256], mid2[256];
};

template <bool CELLS>
__device__ __forceinline__ uint32_t encode_state(const SharedMaps& sm, bool first, float x) {
  if constexpr (CELLS)
    return first ? core::encode_8bit_cells(sm.count1, sm.mid1, x) : core::encode_8bit_cells(sm.count2, sm.mid2, x);
  else
    return first ? core::encode_8bit(sm.code1, x) : core::encode_8bit(sm.code2, x);
}

// IEEE square root (sqrt.rn) in two parts. For v in [2^-101, FLT_MAX]
// sqrt.rn.f32 compiles to this instruction sequence (a reciprocal square root
// estimate and one Newton correction, exactly rounded in that range; the
// compiler branches to a slow path for every other input). sqrt_rn_fast
// computes it unconditionally and flags an input outside the range, so that a
// caller with many elements can redo only those, with __fsqrt_rn, behind one
// branch. The result for an in-range input equals __fsqrt_rn bit for bit
// (tests/gpu/sqrt_check.cu compares all 2^31 non-negative floats).
__device__ __forceinline__ bool sqrt_fast_in_range(float v) {
  return __float_as_uint(v) - 0x0D000000u <= 0x727FFFFFu;
}
__device__ __forceinline__ float sqrt_rn_fast(float v, bool& slow) {
  float r, s, h;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(s) : "f"(v), "f"(r));
  asm("mul.ftz.f32 %0, %1, 0f3F000000;" : "=f"(h) : "f"(r));
  const float e = __fmaf_rn(-s, s, v);
  s = __fmaf_rn(e, h, s);
  slow |= !sqrt_fast_in_range(v);
  return s;
}

// One 256-element block of an 8-bit parameter, one warp: lane l owns elements
// 4l..4l+3 and 128+4l..128+4l+3, so every load and store of the warp is one
// contiguous span. FULL: the block lies wholly before n (no bounds checks).
template <typename T, bool CELLS, bool FULL>
__device__ __forceinline__ void adamw_block(const SharedMaps& sm, const core::AdamWScalars& s, T* __restrict__ p,
                                            const T* __restrict__ g, uint8_t* __restrict__ q1,
                                            uint8_t* __restrict__ q2, float* __restrict__ a1,
                                            float* __restrict__ a2, int64_t qblock, int64_t n, bool vec_p,
                                            bool vec_s, int lane) {
  const int64_t block_start = qblock * core::kAdamBlock;
  int64_t base[2];
  float pv[2][4], gv[2][4], mv[2][4], vv[2][4];
  uint32_t w1[2], w2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    base[h] = block_start + h * 128 + lane * 4;
    load_n<4, FULL>(p, base[h], n, vec_p, pv[h]);
    load_n<4, FULL>(g, base[h], n, vec_p, gv[h]);
    w1[h] = load4_u8<FULL>(q1, base[h], n, vec_s);
    w2[h] = load4_u8<FULL>(q2, base[h], n, vec_s);
  }
  const float am1 = a1[qblock], am2 = a2[qblock];
  float max1 = 0.0f, max2 = 0.0f;
  // core::adamw_element in two passes (its two halves, adamw_moments and
  // adamw_param), so that the square root's out-of-range fix-up is one branch
  // per lane instead of one per element (see sqrt_rn_fast). Pass 1: the
  // moments and sqrt(v); a non-finite gradient keeps the element's m, v and p.
  float sq[2][4];
  uint32_t ok = 0;
  bool sqrt_slow = false;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (FULL || base[h] + j < n) {
        const float m0 = __fmul_rn(sm.code1[(w1[h] >> (8 * j)) & 0xFF], am1);
        const float v0 = __fmul_rn(sm.code2[(w2[h] >> (8 * j)) & 0xFF], am2);
        const float gj = gv[h][j];
        const bool fin = core::is_finite(gj);
        float m1 = m0, v1 = v0;
        core::adamw_moments(s, gj, m1, v1);
        mv[h][j] = fin ? m1 : m0;
        vv[h][j] = fin ? v1 : v0;
        ok |= (fin ? 1u : 0u) << (4 * h + j);
        sq[h][j] = sqrt_rn_fast(vv[h][j], sqrt_slow);
      } else {
        mv[h][j] = 0.0f;  // past the end: must not raise the block absmax
        vv[h][j] = 0.0f;
        sq[h][j] = 0.0f;
      }
      max1 = core::absmax_combine(max1, core::absmax_term(mv[h][j]));
      max2 = core::absmax_combine(max2, core::absmax_term(vv[h][j]));
    }
  if (sqrt_slow) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (!sqrt_fast_in_range(vv[h][j]) && (FULL || base[h] + j < n)) sq[h][j] = __fsqrt_rn(vv[h][j]);
  }
  // Pass 2: the parameter.
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float pn = core::adamw_param(s, pv[h][j], mv[h][j], sq[h][j]);
      if (ok & (1u << (4 * h + j))) pv[h][j] = pn;
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
  const core::InverseScale inv1 = core::inverse_scale(new1), inv2 = core::inverse_scale(new2);
  // The usual block (absmax >= 2^-64) scales with one multiply: x * 1.0f is x
  // exactly, so this is InverseScale's (x * pre) * inv bit for bit. The
  // condition is the same for the whole warp (one block), so it does not diverge.
  uint32_t c1[2] = {0, 0}, c2[2] = {0, 0};
  auto encode_all = [&](auto scale1, auto scale2) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        c1[h] |= encode_state<CELLS>(sm, true, scale1(mv[h][j])) << (8 * j);
        c2[h] |= encode_state<CELLS>(sm, false, scale2(vv[h][j])) << (8 * j);
      }
  };
  if (inv1.pre == 1.0f && inv2.pre == 1.0f)
    encode_all([&](float x) { return __fmul_rn(x, inv1.inv); }, [&](float x) { return __fmul_rn(x, inv2.inv); });
  else
    encode_all(inv1, inv2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // A skipped (non-finite gradient) element stores its unchanged value back.
    store_n<4, FULL>(p, base[h], n, vec_p, pv[h]);
    store4_u8<FULL>(q1, base[h], n, vec_s, c1[h]);
    store4_u8<FULL>(q2, base[h], n, vec_s, c2[h]);
  }
}

// Asks L2 for `bytes` at `ptr` (one bulk prefetch, sm_90; no registers held,
// nothing waits on it). A no-op elsewhere or for an unaligned range.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) == 0 && bytes % 16 == 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(ptr), "r"(bytes) : "memory");
#else
  (void)ptr;
  (void)bytes;
#endif
}

// At most 64 registers: four blocks (32 warps) per SM keep enough loads in flight.
template <typename T>
__global__ void __launch_bounds__(kAdamThreads, 4)
    adamw_multi_tensor_kernel(const __grid_constant__ AdamTensorList tl, const AdamArgs args,
                              const uint8_t* __restrict__ table) {
  __shared__ __align__(16) SharedMaps sm;

  // Which tensor this block works on: the last t with chunk_start[t] <= blockIdx.x,
  // by bisection of the chunk prefix sums (strictly increasing: no tensor of
  // a launch is empty).
  int t = 0;
  {
    const int32_t b = static_cast<int32_t>(blockIdx.x);
    int hi = tl.count - 1;
    while (t < hi) {
      const int mid = (t + hi + 1) >> 1;
      if (tl.chunk_start[mid] <= b)
        t = mid;
      else
        hi = mid - 1;
    }
  }
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

  const int* flags_ok = reinterpret_cast<const int*>(table + kTableFlagOffset);
  const bool cells = flags_ok[0] == 1 && flags_ok[1] == 1;
  {
    const uint4* src = reinterpret_cast<const uint4*>(table);
    uint4* dst = reinterpret_cast<uint4*>(&sm);
    if (cells)
      for (int i = threadIdx.x; i < 2 * kCellBytes / 16; i += kAdamThreads) dst[i] = src[i];
    for (int i = threadIdx.x; i < 256; i += kAdamThreads) {
      sm.code1[i] = args.code1[i];
      sm.code2[i] = args.code2[i];
      if (cells) {
        sm.mid1[i] = reinterpret_cast<const float*>(table + kTableMidOffset)[i];
        sm.mid2[i] = reinterpret_cast<const float*>(table + kTableMidOffset)[256 + i];
      }
    }
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
    if (args.prefetch > 0 && lane < 4) {
      // This warp's blocks it+1 .. it+prefetch of the chunk: all of them on the
      // first pass, afterwards only the one that came into range.
      for (int a = it == 0 ? 1 : it + args.prefetch; a <= it + args.prefetch && a < kBlocksPerWarp; ++a) {
        const int64_t ahead = (qblock + int64_t{a - it} * kAdamWarps) * core::kAdamBlock;
        if (ahead + core::kAdamBlock > n) break;
        if (lane == 0) prefetch_l2(p + ahead, core::kAdamBlock * sizeof(T));
        if (lane == 1) prefetch_l2(g + ahead, core::kAdamBlock * sizeof(T));
        if (lane == 2) prefetch_l2(q1 + ahead, core::kAdamBlock);
        if (lane == 3) prefetch_l2(q2 + ahead, core::kAdamBlock);
      }
    }
    const bool full = block_start + core::kAdamBlock <= n && vec_p && vec_s;
    if (cells) {
      if (full)
        adamw_block<T, true, true>(sm, s, p, g, q1, q2, a1, a2, qblock, n, vec_p, vec_s, lane);
      else
        adamw_block<T, true, false>(sm, s, p, g, q1, q2, a1, a2, qblock, n, vec_p, vec_s, lane);
    } else {
      adamw_block<T, false, false>(sm, s, p, g, q1, q2, a1, a2, qblock, n, vec_p, vec_s, lane);
    }
  }
}

}  // namespace cuda
}  // namespace lowbit
