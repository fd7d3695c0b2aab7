#pragma once
// Alternative schedules of the 8-bit AdamW update (LOWBIT_ADAM_VARIANT, read
// once per process in optim_cuda.cu; the default "base" is
// adamw_multi_tensor_kernel of optim_kernels.cuh). They take the same
// arguments and compute the same bits: each 256-element block goes through
// adamw_block_update (or, for blocks with bounds checks, unaligned views or
// without the encode tables, the same adamw_block dispatch as the base
// kernel), and float32-state chunks through the same element loop. Only the
// order of the work and the timing of the loads differ.
//
//   pipe          one block per chunk, as base; each warp issues the loads of
//                 its next 256-element block before it computes the current
//                 one (two register buffers, the block loop unrolled twice),
//                 so it has a block's loads in flight while it computes.
//   persist       a resident grid (blocks per SM from the occupancy API x SMs);
//                 each block takes a contiguous range of chunks, copies the
//                 maps into shared memory once and synchronizes once; the
//                 warps then run through the range independently.
//   persist_pipe  both: a warp's last block of a chunk prefetches its first
//                 block of the next chunk (of the same or the next tensor),
//                 so the pipeline drains only at the end of the range (or at
//                 a block that is not "fast", see below).
//
// Inside a chunk every warp takes the same 256-element blocks as in the base
// kernel (qblock = chunk * 64 + it * 8 + warp, it = 0..7, those that start
// before n), and a chunk of a float32-state tensor the same elements per
// thread. Chunks are independent (each element belongs to one block of one
// chunk), so the order in which a block takes its chunks changes nothing.
//
// Registers (ptxas, sm_80 and sm_90, no spills): the base kernel fits 64
// (4 blocks of 256 threads per SM). The chunk loop of the persistent kernels
// and the second buffer of loads (~22 registers for float32 parameters, ~14
// for 16-bit) do not: persist is compiled for 3 blocks per SM (80
// registers), pipe and persist_pipe for 2 (128 registers).
#include "optim/optim_kernels.cuh"

namespace lowbit {
namespace cuda {

// Blocks of kAdamThreads per SM the variants are compiled for (see above).
constexpr int kPipeMinBlocks = 2;
constexpr int kPersistMinBlocks = 3;

// The tensor of chunk c of a launch: the last t >= lo with chunk_start[t] <= c,
// by bisection of the chunk prefix sums (strictly increasing: no tensor of a
// launch is empty).
__device__ __forceinline__ int find_tensor(const AdamTensorList& tl, int32_t c, int lo) {
  int t = lo;
  int hi = tl.count - 1;
  while (t < hi) {
    const int mid = (t + hi + 1) >> 1;
    if (tl.chunk_start[mid] <= c)
      t = mid;
    else
      hi = mid - 1;
  }
  return t;
}

// x, hidden from the compiler's loop optimizations (a move, nothing else):
// values derived from it are computed where they are used, in the chunk
// loop, instead of being hoisted out of it and kept in registers across it,
// which spilled.
__device__ __forceinline__ int32_t opaque(int32_t x) {
  asm volatile("mov.b32 %0, %0;" : "+r"(x));
  return x;
}
template <typename P>
__device__ __forceinline__ P* opaque(P* x) {
  asm volatile("mov.b64 %0, %0;" : "+l"(x));
  return x;
}

template <typename T>
struct RawVec {
  using type = uint2;  // 4 16-bit values
};
template <>
struct RawVec<float> {
  using type = float4;
};

// Whether the encode tables serve both maps of this call (see build_map_cells).
__device__ __forceinline__ bool tables_ok(const uint8_t* __restrict__ table) {
  const int* flags_ok = reinterpret_cast<const int*>(table + kTableFlagOffset);
  return flags_ok[0] == 1 && flags_ok[1] == 1;
}

// One lane's loads of one 256-element block, as loaded (no conversion yet).
template <typename T>
struct RawBlock {
  typename RawVec<T>::type p[2], g[2];
  uint32_t w1[2], w2[2];
  float am1, am2;
};

// The loads of a "fast" block (8-bit states, encode tables, aligned views,
// wholly before n; the base kernel's adamw_block<T, true, true>): the same
// addresses and widths as load_n / load4_u8 take for it, in the same order.
template <typename T>
__device__ __forceinline__ void load_raw_block(RawBlock<T>& r, const T* __restrict__ p, const T* __restrict__ g,
                                               const uint8_t* __restrict__ q1, const uint8_t* __restrict__ q2,
                                               const float* __restrict__ a1, const float* __restrict__ a2,
                                               int64_t qblock, int lane) {
  using V = typename RawVec<T>::type;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t base = qblock * core::kAdamBlock + h * 128 + lane * 4;
    r.p[h] = *reinterpret_cast<const V*>(p + base);
    r.g[h] = *reinterpret_cast<const V*>(g + base);
    r.w1[h] = *reinterpret_cast<const uint32_t*>(q1 + base);
    r.w2[h] = *reinterpret_cast<const uint32_t*>(q2 + base);
  }
  r.am1 = a1[qblock];
  r.am2 = a2[qblock];
}

template <typename T>
__device__ __forceinline__ void unpack_raw(float4 r, float v[4]) {
  v[0] = r.x, v[1] = r.y, v[2] = r.z, v[3] = r.w;
}
template <typename T>
__device__ __forceinline__ void unpack_raw(uint2 r, float v[4]) {
  unpack2<T>(r.x, v[0], v[1]);
  unpack2<T>(r.y, v[2], v[3]);
}

// One block of the warp: `fast` (then `r` holds its loads) through
// adamw_block_update<T, true, true>, else the base kernel's dispatch for a
// block that is not fast: adamw_block<T, cells, false>.
template <typename T>
__device__ __forceinline__ void adamw_block_pipe(const SharedMaps& sm, const core::AdamWScalars& s,
                                                 const RawBlock<T>& r, bool fast, bool cells, T* __restrict__ p,
                                                 const T* __restrict__ g, uint8_t* __restrict__ q1,
                                                 uint8_t* __restrict__ q2, float* __restrict__ a1,
                                                 float* __restrict__ a2, int64_t qblock, int64_t n, bool vec_p,
                                                 bool vec_s, int lane) {
  if (fast) {
    int64_t base[2];
    float pv[2][4], gv[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      base[h] = qblock * core::kAdamBlock + h * 128 + lane * 4;
      unpack_raw<T>(r.p[h], pv[h]);
      unpack_raw<T>(r.g[h], gv[h]);
    }
    adamw_block_update<T, true, true>(sm, s, p, q1, q2, a1, a2, qblock, n, true, true, lane, base, pv, gv, r.w1,
                                      r.w2, r.am1, r.am2);
  } else if (cells) {
    adamw_block<T, true, false>(sm, s, p, g, q1, q2, a1, a2, qblock, n, vec_p, vec_s, lane);
  } else {
    adamw_block<T, false, false>(sm, s, p, g, q1, q2, a1, a2, qblock, n, vec_p, vec_s, lane);
  }
}

// PIPE: each warp prefetches its next block (pipe, persist_pipe). PERSIST: a
// resident grid, each block takes a contiguous range of the launch's chunks
// in order; otherwise block b takes chunk b, as base.
template <typename T, bool PIPE, bool PERSIST>
__global__ void __launch_bounds__(kAdamThreads, PIPE ? kPipeMinBlocks : kPersistMinBlocks)
    adamw_multi_tensor_kernel_variant(const __grid_constant__ AdamTensorList tl, const AdamArgs args,
                                      const uint8_t* __restrict__ table) {
  __shared__ __align__(16) SharedMaps sm;

  // PERSIST: block b takes chunks [range_end(b - 1), range_end(b)) of the
  // launch's C chunks (C / G or C / G + 1 of them, G = gridDim.x). 32-bit
  // arithmetic: a 64-bit division subroutine left the chunk index and
  // everything derived from it outside the uniform registers.
  const auto range_end = [&](uint32_t b) -> int32_t {
    if constexpr (PERSIST) {
      const uint32_t total = static_cast<uint32_t>(tl.chunk_start[tl.count]);
      const uint32_t per = total / gridDim.x, extra = total % gridDim.x;
      return static_cast<int32_t>((b + 1) * per + min(b + 1, extra));
    } else {
      return static_cast<int32_t>(b + 1);
    }
  };
  const int32_t c_begin = blockIdx.x == 0 ? 0 : range_end(blockIdx.x - 1);

  // The maps, once per block: whenever the launch (PERSIST) or the block's
  // chunk has 8-bit states. `table` is null only when no tensor of the call
  // has 8-bit states.
  bool maps;
  if constexpr (PERSIST)
    maps = table != nullptr;
  else
    maps = tl.flags[find_tensor(tl, c_begin, 0)] & kEightBit;
  // Whether the encode tables serve this call, read back per chunk (a bool
  // kept in a register across the chunk loop spilled on sm_80).
  __shared__ bool cells_shared;
  if (threadIdx.x == 0) cells_shared = maps && tables_ok(table);
  if (maps) {
    const bool cells = tables_ok(table);
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
  __syncthreads();  // the only one: from here on the warps are independent

  // PIPE: two buffers of loads, used alternately (the loop over a chunk's
  // blocks is unrolled twice, so neither is ever copied). `pref`: `a` already
  // holds the loads of the warp's first block of chunk c, issued while the
  // last block of the previous chunk was computed.
  RawBlock<T> a, b;
  bool pref = false;

  // Registers: the chunk loop carries next to nothing. Everything per chunk
  // (tensor, scalars, pointers, lr, the end of the range) is derived anew
  // from the chunk index (and the block index), which the compiler sees as
  // opaque, so none of it is hoisted out of the loop and kept live across it.
#pragma unroll 1
  for (int32_t c_next = c_begin; c_next < range_end(static_cast<uint32_t>(opaque(static_cast<int32_t>(blockIdx.x))));
       ++c_next) {
    const int32_t c = opaque(c_next);
    const int t = find_tensor(tl, c, 0);
    const float lr = args.lr_ptr != nullptr ? *opaque(args.lr_ptr) : args.lr_value;
    const bool cells = cells_shared;
    const core::AdamWScalars s =
        core::make_scalars(lr, *tl.step[t], args.beta1, args.beta2, args.eps, args.weight_decay);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int64_t chunk = static_cast<int64_t>(c) - tl.chunk_start[t];
    const int64_t n = tl.n[t];
    const uint8_t flags = tl.flags[t];
    T* __restrict__ p = static_cast<T*>(tl.p[t]);
    const T* __restrict__ g = static_cast<const T*>(tl.g[t]);

    if (!(flags & kEightBit)) {
      // float32 states: this thread's elements of the chunk, as in the base kernel.
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
      continue;
    }

    uint8_t* __restrict__ q1 = static_cast<uint8_t*>(tl.s1[t]);
    uint8_t* __restrict__ q2 = static_cast<uint8_t*>(tl.s2[t]);
    float* __restrict__ a1 = tl.a1[t];
    float* __restrict__ a2 = tl.a2[t];
    const bool vec_p = flags & kVecParam;
    const bool vec_s = flags & kVecState;
    // The warps of a block sweep consecutive 256-element blocks together.
    const int64_t q0 = chunk * (kAdamWarps * kBlocksPerWarp) + warp;

    if constexpr (!PIPE) {
#pragma unroll 1
      for (int it = 0; it < kBlocksPerWarp; ++it) {
        const int64_t qblock = q0 + it * kAdamWarps;
        const int64_t block_start = qblock * core::kAdamBlock;
        if (block_start >= n) continue;
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
    } else {
      const bool fast_views = cells && vec_p && vec_s;
      // Whether block qblock (before n) is fast: its loads go into a buffer ahead of time.
#define LOWBIT_FAST(qblock) (fast_views && ((qblock) + 1) * core::kAdamBlock <= n)
      if (!pref && q0 * core::kAdamBlock < n && LOWBIT_FAST(q0)) load_raw_block(a, p, g, q1, q2, a1, a2, q0, lane);
      pref = false;
#pragma unroll 1
      for (int it = 0; it < kBlocksPerWarp; it += 2) {
        const int64_t qa = q0 + it * kAdamWarps;  // in a
        if (qa * core::kAdamBlock >= n) break;
        const int64_t qb = qa + kAdamWarps;  // in b
        const bool has_b = qb * core::kAdamBlock < n;
        if (has_b && LOWBIT_FAST(qb)) load_raw_block(b, p, g, q1, q2, a1, a2, qb, lane);
        adamw_block_pipe<T>(sm, s, a, LOWBIT_FAST(qa), cells, p, g, q1, q2, a1, a2, qa, n, vec_p, vec_s, lane);
        if (!has_b) break;
        if (it + 2 < kBlocksPerWarp) {
          const int64_t qn = qb + kAdamWarps;
          if (qn * core::kAdamBlock < n && LOWBIT_FAST(qn)) load_raw_block(a, p, g, q1, q2, a1, a2, qn, lane);
        } else if (PERSIST && c + 1 < range_end(blockIdx.x)) {
          // The last block of the warp in this chunk: prefetch its first
          // block of the next chunk (of this tensor or the next one).
          const int t2 = opaque(tl.chunk_start[t + 1] <= c + 1 ? t + 1 : t);
          const uint8_t f2 = tl.flags[t2];
          const int64_t n2 = tl.n[t2];
          const int64_t qn = (static_cast<int64_t>(c + 1) - tl.chunk_start[t2]) * (kAdamWarps * kBlocksPerWarp) + warp;
          if (cells && (f2 & kEightBit) && (f2 & kVecParam) && (f2 & kVecState) &&
              (qn + 1) * core::kAdamBlock <= n2) {
            load_raw_block(a, static_cast<const T*>(tl.p[t2]), static_cast<const T*>(tl.g[t2]),
                           static_cast<const uint8_t*>(tl.s1[t2]), static_cast<const uint8_t*>(tl.s2[t2]),
                           tl.a1[t2], tl.a2[t2], qn, lane);
            pref = true;
          }
        }
        adamw_block_pipe<T>(sm, s, b, LOWBIT_FAST(qb), cells, p, g, q1, q2, a1, a2, qb, n, vec_p, vec_s, lane);
      }
#undef LOWBIT_FAST
    }
  }
}

}  // namespace cuda
}  // namespace lowbit
