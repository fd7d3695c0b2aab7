#pragma once
// CUDA kernels of the 4-bit matmul ops.
//
// gemm_4bit_tc_kernel (forward, small and medium M): tensor cores
// (mma.sync m16n8k16, fp32 accumulate) with the weight as the A operand
// (16 weight rows per warp) and x^T as B (8 rows of x per m-tile). The packed
// weight is streamed once from global memory straight into registers and
// decoded there: one shared-memory lookup turns a packed byte (two codes)
// into the two 16-bit code values of an A-fragment register. The per-block
// scale is not applied to the codes; each mma step only spans k-values of one
// quantization block, so the scale multiplies the step's fp32 partial sums
// instead (exact code values, one fp32 multiply per block and output).
//
// gemv_t_kernel (backward for x, M <= 4): out[m, k] = sum_n g[m, n] W[n, k].
// Each warp streams whole weight rows (8 bytes per lane, coalesced), folds the
// row's scale into g[m, n] and accumulates code * (g * scale) in fp32.
//
// splitk_reduce_kernel: sums the fp32 partials of a split reduction, adds the
// bias, casts to the output dtype.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "gemm/gemv_prims.cuh"
#include "quantize/quantize_kernels.cuh"

namespace lowbit {
namespace cuda {
namespace gemm {

// ---------------------------------------------------------------- helpers

template <typename T>
__device__ __forceinline__ uint32_t bits16(float v) {
  return static_cast<uint32_t>(from_float<T>(v).x);
}

// One m16n8k16 step (d += a * b, fp32 accumulators): the GEMV's primitive.
using gemv::mma16816;

// Streaming loads of the packed weight: read once, so keep them out of L1
// (where the activations are reused).
template <int BYTES>
__device__ __forceinline__ void load_stream(const uint8_t* p, uint32_t* dst) {
  if constexpr (BYTES == 16) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3])
                 : "l"(p));
  } else if constexpr (BYTES == 8) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(dst[0]), "=r"(dst[1]) : "l"(p));
  } else {
    static_assert(BYTES == 4, "4, 8 or 16 bytes");
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(dst[0]) : "l"(p));
  }
}

// ---------------------------------------------------------------- forward, tensor cores

struct TcArgs {
  const void* x;           // [M, K], T
  const uint8_t* packed;   // [N * K / 2]
  const float* code;       // [16]
  ScaleArgs s;
  int block_shift;         // log2(blocksize)
  const void* bias;        // [N], T, or nullptr (used only when splits == 1)
  void* out;               // [M, N], T (splits == 1)
  float* partial;          // [splits, M, N] fp32 (splits > 1)
  int M, N, K;
  int rw;                  // warps along N in a block (1, 2, 4 or 8); 8 / rw split K
  int row_tiles;           // blocks along N
  int m_chunks;            // blocks along M (MT * 8 rows of x each)
  int splits;              // blocks along K
};

constexpr int kTcThreads = 256;
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kKIter = 256;  // k-values of a weight row per warp iteration (128 packed bytes)
// Lookup table: byte -> two 16-bit code values; 32 copies, one per bank, so
// the 32 lanes of a warp never conflict whatever bytes they look up.
constexpr int kLutBytes = 256 * 32 * 4;

__host__ __device__ constexpr int tc_smem_bytes(int mt) {
  return kLutBytes + 1024 > mt * 4 * 32 * 4 * kTcWarps ? kLutBytes + 1024 : mt * 4 * 32 * 4 * kTcWarps;
}

// A quantization block's scale in two halves: the global loads (issued an
// iteration ahead) and the arithmetic (at use). Nested: the product is rounded
// before the offset is added, as load_scale does.
struct ScaleRaw {
  float a;     // the float32 scale, or the nested block's absmax
  uint32_t q;  // nested: the 8-bit code
};

template <bool NESTED>
__device__ __forceinline__ ScaleRaw load_scale_raw(const ScaleArgs& s, int64_t block) {
  if constexpr (NESTED)
    return ScaleRaw{__ldg(s.nested_absmax + (block >> s.nested_shift)), static_cast<uint32_t>(__ldg(s.absmax_q + block))};
  else
    return ScaleRaw{__ldg(s.absmax + block), 0u};
}

template <bool NESTED>
__device__ __forceinline__ float finish_scale(const ScaleRaw& r, const float* nested_code_s, float offset) {
  if constexpr (NESTED)
    return __fmul_rn(nested_code_s[r.q], r.a) + offset;
  else
    return r.a;
}

// MT: m-tiles of 8 rows of x per block. CH: packed bytes per lane per weight
// row per chunk; a chunk (4 lanes x CH bytes = 8 * CH k-values) lies inside one
// quantization block, so CH = min(blocksize, 128) / 8 and each mma step (16
// k-values, 4 from each of the 4 lanes sharing a row) has a single scale.
template <typename T, int MT, int CH, bool NESTED>
__global__ void __launch_bounds__(kTcThreads, 1) gemm_4bit_tc_kernel(const TcArgs args) {
  static_assert(CH == 4 || CH == 8 || CH == 16, "chunk of 4, 8 or 16 bytes");
  constexpr int CPI = 128 / (4 * CH);  // chunks per iteration
  constexpr int SP = CH / 4;           // 32-bit words (= step pairs) per chunk
  extern __shared__ __align__(16) uint32_t smem[];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;   // mma group: weight rows g and g + 8, x row g of each m-tile
  const int tig = lane & 3;  // thread in group

  // Fill the lookup table: thread t owns byte t (the low 16 bits hold the code
  // of the high nibble, the earlier element) and writes its 32 copies, bank-
  // staggered so the stores do not conflict either.
  {
    const int b = threadIdx.x;
    const uint32_t word = bits16<T>(__ldg(args.code + (b >> 4))) | (bits16<T>(__ldg(args.code + (b & 15))) << 16);
#pragma unroll 8
    for (int r = 0; r < 32; ++r) smem[b * 32 + ((r + b) & 31)] = word;
  }
  // The nested code (256 floats) beside the table: the second, dependent
  // lookup of a double-quantized scale then costs a shared load, not a global one.
  float* nested_code_s = reinterpret_cast<float*>(smem + 256 * 32);
  float offset = 0.0f;
  if constexpr (NESTED) {
    nested_code_s[threadIdx.x] = __ldg(args.s.nested_code + threadIdx.x);
    offset = __ldg(args.s.offset);
  }
  __syncthreads();
  const uint32_t* lut = smem + lane;

  int bid = blockIdx.x;
  const int mc = bid % args.m_chunks;
  bid /= args.m_chunks;
  const int rt = bid % args.row_tiles;
  const int split = bid / args.row_tiles;
  const int rw = warp % args.rw;
  const int kw = warp / args.rw;
  const int kwarps = kTcWarps / args.rw;

  const int K = args.K;
  const int N = args.N;
  const int n0 = (rt * args.rw + rw) * 16;
  const int rows[2] = {n0 + g, n0 + g + 8};
  const bool row_ok[2] = {rows[0] < N, rows[1] < N};
  const uint8_t* wrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    wrow[h] = args.packed + static_cast<int64_t>(row_ok[h] ? rows[h] : 0) * (K / 2) + tig * CH;

  const int m0 = mc * MT * 8;
  const T* xrow[MT];
  bool x_ok[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int m = m0 + j * 8 + g;
    x_ok[j] = m < args.M;
    xrow[j] = reinterpret_cast<const T*>(args.x) + static_cast<int64_t>(x_ok[j] ? m : 0) * K + tig * 2 * CH;
  }

  const int iters = K / kKIter;
  const int it_begin = static_cast<int>(static_cast<int64_t>(split) * iters / args.splits);
  const int it_end = static_cast<int>(static_cast<int64_t>(split + 1) * iters / args.splits);

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;

  // Everything an iteration needs from global memory is requested one
  // iteration ahead (weight bytes, raw scales, and for MT == 1 the x values),
  // so a warp waits on memory latency once, not once per chunk.
  constexpr bool XPF = MT == 1;
  constexpr int XW = XPF ? CPI * SP : 1;
  uint32_t wv[2][CPI][SP];
  ScaleRaw sr[2][CPI];
  uint4 xp[XW];
  auto load_iter = [&](int it) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < CPI; ++c) {
        if (row_ok[h]) {
          load_stream<CH>(wrow[h] + it * (kKIter / 2) + c * 4 * CH, wv[h][c]);
          sr[h][c] = load_scale_raw<NESTED>(args.s, (static_cast<int64_t>(rows[h]) * K + it * kKIter + c * 8 * CH) >>
                                                        args.block_shift);
        } else {
#pragma unroll
          for (int s = 0; s < SP; ++s) wv[h][c][s] = 0;  // rows past N contribute nothing
          sr[h][c] = ScaleRaw{0.0f, 0u};
        }
      }
    if constexpr (XPF) {
#pragma unroll
      for (int c = 0; c < CPI; ++c)
#pragma unroll
        for (int s = 0; s < SP; ++s)
          xp[c * SP + s] = x_ok[0] ? __ldg(reinterpret_cast<const uint4*>(xrow[0] + it * kKIter + c * 8 * CH + 8 * s))
                                   : make_uint4(0, 0, 0, 0);
    }
  };

  int it = it_begin + kw;
  if (it < it_end) load_iter(it);
  for (; it < it_end; it += kwarps) {
    uint32_t cur[2][CPI][SP];
    ScaleRaw csr[2][CPI];
    uint4 cx[XW];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < CPI; ++c) {
        csr[h][c] = sr[h][c];
#pragma unroll
        for (int s = 0; s < SP; ++s) cur[h][c][s] = wv[h][c][s];
      }
#pragma unroll
    for (int i = 0; i < XW; ++i) cx[i] = xp[i];
    if (it + kwarps < it_end) load_iter(it + kwarps);
    // Two iterations ahead, only into L2 (costs no registers): one 128-byte
    // line per weight row, so the register prefetch above finds it in L2.
    if (tig == 0 && it + 2 * kwarps < it_end) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (row_ok[h]) asm volatile("prefetch.global.L2 [%0];" ::"l"(wrow[h] + (it + 2 * kwarps) * (kKIter / 2)));
    }

#pragma unroll
    for (int c = 0; c < CPI; ++c) {
      const int kc = it * kKIter + c * 8 * CH;  // first k of this chunk
      float sc[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) sc[h] = finish_scale<NESTED>(csr[h][c], nested_code_s, offset);
      float tmp[MT][4];
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) tmp[j][i] = 0.0f;
#pragma unroll
      for (int s = 0; s < SP; ++s) {
        // 8 k-values of x per lane and m-tile: kc + tig * 2 * CH + 8 * s + [0, 8)
        uint4 xv[MT];
        if constexpr (XPF) {
          xv[0] = cx[c * SP + s];
        } else {
#pragma unroll
          for (int j = 0; j < MT; ++j) {
            if (x_ok[j])
              xv[j] = __ldg(reinterpret_cast<const uint4*>(xrow[j] + kc + 8 * s));
            else
              xv[j] = make_uint4(0, 0, 0, 0);
          }
        }
        const uint32_t w0 = cur[0][c][s];
        const uint32_t w1 = cur[1][c][s];
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          // Bytes 2t and 2t+1 of the word: k-pairs (8s + 4t, +1) and (+2, +3).
          uint32_t a[4];
          a[0] = lut[((w0 >> (16 * t)) & 0xFF) * 32];
          a[1] = lut[((w1 >> (16 * t)) & 0xFF) * 32];
          a[2] = lut[((w0 >> (16 * t + 8)) & 0xFF) * 32];
          a[3] = lut[((w1 >> (16 * t + 8)) & 0xFF) * 32];
#pragma unroll
          for (int j = 0; j < MT; ++j) {
            const uint32_t b0 = t == 0 ? xv[j].x : xv[j].z;
            const uint32_t b1 = t == 0 ? xv[j].y : xv[j].w;
            mma16816<T>(tmp[j], a, b0, b1);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        acc[j][0] = fmaf(tmp[j][0], sc[0], acc[j][0]);
        acc[j][1] = fmaf(tmp[j][1], sc[0], acc[j][1]);
        acc[j][2] = fmaf(tmp[j][2], sc[1], acc[j][2]);
        acc[j][3] = fmaf(tmp[j][3], sc[1], acc[j][3]);
      }
    }
  }

  // Sum the K-split warps of each row tile through shared memory (the lookup
  // table is no longer needed), lane-contiguous so the accesses don't conflict.
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[((warp * MT + j) * 4 + i) * 32 + lane] = acc[j][i];
  __syncthreads();
  // Each warp finishes an equal share of its row tile's outputs.
  const int share = (MT * 4 + kwarps - 1) / kwarps;
  for (int q = kw * share; q < min(MT * 4, (kw + 1) * share); ++q) {
    const int j = q >> 2, i = q & 3;
    float v = 0.0f;
    for (int w = rw; w < kTcWarps; w += args.rw) v += red[((w * MT + j) * 4 + i) * 32 + lane];
    const int row = (i >> 1) ? rows[1] : rows[0];
    const int m = m0 + j * 8 + tig * 2 + (i & 1);
    if (row >= N || m >= args.M) continue;
    if (args.splits == 1) {
      if (args.bias) v += to_float(reinterpret_cast<const T*>(args.bias)[row]);
      reinterpret_cast<T*>(args.out)[static_cast<int64_t>(m) * N + row] = from_float<T>(v);
    } else {
      args.partial[(static_cast<int64_t>(split) * args.M + m) * N + row] = v;
    }
  }
}

// ---------------------------------------------------------------- split reduction

// out[i] = T(sum_s partial[s * n + i] + bias[i % cols])
template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const float* __restrict__ partial, int splits, int64_t n,
                                                            int64_t cols, const T* __restrict__ bias,
                                                            T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[s * n + i];
  if (bias) v += to_float(bias[i % cols]);
  out[i] = from_float<T>(v);
}

// ---------------------------------------------------------------- backward, transposed GEMV

struct GemvTArgs {
  const void* g;           // [M, N], T
  const uint8_t* packed;   // [N * K / 2]
  const float* code;       // [16]
  ScaleArgs s;
  int block_shift;
  float* partial;          // [splits, M, K] fp32
  int M, N, K;
  int slices;              // blocks along K (512 k-values each)
  int splits;              // blocks along N
};

constexpr int kGemvTThreads = 256;
constexpr int kGemvTSlice = 512;  // k-values per block: 32 lanes x 16
constexpr int kGemvTRows = 8;     // weight rows in flight per warp

// Requires K % 16 == 0 (a lane's 16 k-values share one scale and an 8-byte
// aligned load). MAXM: rows of g (<= 4).
template <typename T, int MAXM, bool NESTED>
__global__ void __launch_bounds__(kGemvTThreads) gemv_t_kernel(const GemvTArgs args) {
  __shared__ float cb[16];
  __shared__ float nested_code_s[NESTED ? 256 : 1];
  // [m][e][lane] padded to 33 lanes: conflict-free both when lanes write and
  // when consecutive threads read consecutive k.
  __shared__ float red[MAXM * 16 * 33];
  if (threadIdx.x < 16) cb[threadIdx.x] = args.code[threadIdx.x];
  float offset = 0.0f;
  if constexpr (NESTED) {
    nested_code_s[threadIdx.x] = __ldg(args.s.nested_code + threadIdx.x);
    offset = __ldg(args.s.offset);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int warps = kGemvTThreads / 32;
  const int slice = blockIdx.x % args.slices;
  const int split = blockIdx.x / args.slices;
  const int K = args.K, N = args.N, M = args.M;
  const int k0 = slice * kGemvTSlice + lane * 16;
  const bool k_ok = k0 < K;  // K % 16 == 0: a lane is wholly in or out
  const int n_begin = static_cast<int>(static_cast<int64_t>(split) * N / args.splits);
  const int n_end = static_cast<int>(static_cast<int64_t>(split + 1) * N / args.splits);
  const T* gp = reinterpret_cast<const T*>(args.g);

  float acc[MAXM][16];
#pragma unroll
  for (int m = 0; m < MAXM; ++m)
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[m][e] = 0.0f;

  for (int n = n_begin + warp * kGemvTRows; n < n_end; n += warps * kGemvTRows) {
    uint32_t wv[kGemvTRows][2];
    float gs[kGemvTRows][MAXM];
#pragma unroll
    for (int r = 0; r < kGemvTRows; ++r) {
      const int row = n + r;
      const bool ok = k_ok && row < n_end;
      if (ok) {
        const int64_t e = static_cast<int64_t>(row) * K + k0;
        load_stream<8>(args.packed + e / 2, wv[r]);
        const float sc = finish_scale<NESTED>(load_scale_raw<NESTED>(args.s, e >> args.block_shift), nested_code_s, offset);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
          gs[r][m] = m < M ? to_float(gp[static_cast<int64_t>(m) * N + row]) * sc : 0.0f;
      } else {
        wv[r][0] = wv[r][1] = 0;
#pragma unroll
        for (int m = 0; m < MAXM; ++m) gs[r][m] = 0.0f;
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvTRows; ++r)
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        // Element e: byte e / 2, high nibble first.
        const uint32_t byte = (wv[r][e >> 3] >> (8 * ((e >> 1) & 3))) & 0xFF;
        const float c = cb[(e & 1) ? (byte & 15) : (byte >> 4)];
#pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[m][e] = fmaf(c, gs[r][m], acc[m][e]);
      }
  }

  // Sum the warps' partials in a fixed order (deterministic), one warp at a time.
  for (int w = 0; w < warps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int m = 0; m < MAXM; ++m)
#pragma unroll
        for (int e = 0; e < 16; ++e) {
          float& slot = red[(m * 16 + e) * 33 + lane];
          slot = (w == 0 ? 0.0f : slot) + acc[m][e];
        }
    }
    __syncthreads();
  }
  for (int q = threadIdx.x; q < MAXM * kGemvTSlice; q += kGemvTThreads) {
    const int m = q / kGemvTSlice, kk = q % kGemvTSlice;
    const int k = slice * kGemvTSlice + kk;
    if (m >= M || k >= K) continue;
    args.partial[(static_cast<int64_t>(split) * M + m) * K + k] = red[(m * 16 + (kk & 15)) * 33 + (kk >> 4)];
  }
}

}  // namespace gemm
}  // namespace cuda
}  // namespace lowbit
