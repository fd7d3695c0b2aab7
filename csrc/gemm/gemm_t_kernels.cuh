#pragma once
// Backward 4-bit matmul for x on tensor cores (gemm_4bit_t from two rows of
// g up to a few tens; gemm_cuda.cu picks the path):
//   out[m, k] = sum_n g[m, n] * code(W[n, k]) * scale(n, k)
//
// The reduction runs over n, the weight's rows, and the scale changes with n,
// so (unlike the forward, which reduces over k inside one quantization block
// and scales the partial sums) the scale cannot wait until after the mma: it
// is folded into g. mma.sync m16n8k16 with
//  - A = W^T, 16 k-values (the output rows) x 16 weight rows (the reduction),
//  - B = (g * scale)^T, 16 weight rows x 8 rows of g,
// so the B fragment of a lane holds g[m][n] * scale(n, kb) for the four weight
// rows the lane also holds in A: one packed 16-bit multiply per two values
// puts the scale in (the scale rounded to T, then the product; the
// dequantize-then-matmul path rounds code * scale once). Against a float32
// reference that makes the error ~1.5x the dequantize path's, within the
// tests' 2x. In fp16, g * scale must stay below 65504; with scales of at
// most 1 (weights in [-1, 1]) it is never larger than g.
//
// Warp tile: 64 k-values (32 bytes of each weight row) by a run of 16-row
// steps. The mma's reduction index r of a step maps to weight row
// 4 (r / 2 % 4) + 2 (r / 8) + r % 2, so that lane t (= lane % 4), which holds
// r = 2t, 2t+1, 2t+8, 2t+9 in A and B, holds rows 4t .. 4t + 3: its g values
// are one 8-byte load. For every step a lane loads one 32-bit word from each
// of its rows: bytes [4 grp, 4 grp + 4) of the tile (grp = lane / 4). Byte j
// of the word feeds the tile's mma j, whose A row grp is k = 8 grp + 2j (the
// byte's high nibble) and A row grp + 8 is k + 1 (its low nibble). A register of A pairs two weight rows at one k; the
// two nibbles of rows n and n+1 are merged into one byte (high nibble from row
// n) with a shift and a bit-select, and one lookup in the byte -> two codes
// table (the forward's table, 32 copies) yields the register. The tile's 64
// k-values lie in one quantization block (blocksize >= 64, K % 64 == 0), so a
// lane needs one scale per row and step.
//
// A block: 8 warps, `cw` of them side by side along K (cw tiles, 64 * cw
// k-values), the other 8 / cw interleaving the steps of the block's N range;
// those are summed in shared memory in a fixed order. N is split across blocks
// (fp32 partials, summed in split order by splitk_reduce_kernel) until the
// blocks fill the resident slots of the chip once; MT = 1, 2, 4 or 8 m-tiles
// of 8 rows (MT = 8: 128 accumulators per thread, one block per SM); M beyond
// 64 rows takes more blocks (m chunks), each streaming the weight again.
#include <cstdint>

#include "gemm/gemv_kernels.cuh"

namespace lowbit {
namespace cuda {
namespace gemv {

struct GemmTArgs {
  const void* g;          // [M, N], T
  const uint8_t* packed;  // [N * K / 2], 4-byte aligned
  const float* code;      // [16]
  ScaleArgs s;
  int block_shift;        // log2(blocksize), >= 6
  void* out;              // [M, K], T, 16-byte aligned (splits == 1)
  float* partial;         // [splits, M, K] fp32, 16-byte aligned (splits > 1)
  int M, N, K;            // K % 64 == 0
  int g_vec;              // g read 4 values at a time (N % 4 == 0, g 8-byte aligned)
  int cw;                 // warps side by side along K in a block (1, 2, 4, 8)
  int col_blocks;         // blocks along K
  int m_chunks;           // blocks along M (8 * MT rows each)
  int splits;             // blocks along N
  int steps;              // 16-row steps covering N
  int pf;                 // L2 prefetch distance in a warp's steps (0: none)
};

constexpr int kTtWarps = 8;
constexpr int kTtThreads = kTtWarps * 32;
constexpr int kTtK = 64;  // k-values of a warp's tile

// Shared memory: the table and the nested code, later the reduction buffer.
__host__ __device__ constexpr int tt_smem_bytes(int mt) {
  return kLutBytes + 1024 > kTtThreads * mt * 16 * 4 ? kLutBytes + 1024 : kTtThreads * mt * 16 * 4;
}

// Two floats rounded to T and packed (lo in the low half).
template <typename T>
__host__ __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(LOWBIT_GEMV_DEV)
  uint32_t r;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return bits16<T>(lo) | (bits16<T>(hi) << 16);
#endif
}

// Two packed T values times two packed T values, each product rounded to T.
template <typename T>
__host__ __device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
#if defined(LOWBIT_GEMV_DEV)
  uint32_t r;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  const float lo = from_bits16<T>(a & 0xFFFFu) * from_bits16<T>(b & 0xFFFFu);
  const float hi = from_bits16<T>(a >> 16) * from_bits16<T>(b >> 16);
  return bits16<T>(lo) | (bits16<T>(hi) << 16);
#endif
}

// 32 bits of the weight stream, not allocated in L1.
__host__ __device__ __forceinline__ uint32_t ldg_stream4(const void* p) {
#if defined(LOWBIT_GEMV_DEV)
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
#else
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_global(p, 4, false);
#endif
  return *static_cast<const uint32_t*>(p);
#endif
}

// What a lane loads for one 16-row step: its four weight words (rows 4t ..
// 4t + 3 of the step), the raw scale of row lane % 16 (shared with the other
// lanes by shuffles), and per m-tile the g values of its four rows (two
// 16-bit pairs). Nothing here is computed from a loaded value: the step is
// loaded one step before it is used, and an instruction that consumed a
// loaded value here would wait for the load at once (ncu: a select of the
// loaded g values took 35-54% of the kernel's stall samples).
template <int MT, bool NESTED>
struct TtStep {
  uint32_t w[4];
  float sa;     // the float scale, or the nested block's absmax
  uint32_t sq;  // nested: the 8-bit code
  uint32_t gv[MT][2];
  bool rows_ok;  // the lane's four rows exist (the 4-value g path zeroes gv by it when used)
};

template <typename T, int MT, bool NESTED>
__host__ __device__ __forceinline__ void gemm_t_block(const GemmTArgs& a, uint8_t* smem) {
  static_assert(MT == 1 || MT == 2 || MT == 4 || MT == 8, "1, 2, 4 or 8 tiles of 8 rows of g");
  const int tid = thread_index();
  const int lane = tid & 31, warp = tid >> 5;
  const int grp = lane >> 2, t = lane & 3;
  const int cw = a.cw, nwarps = kTtWarps / cw;
  const int ci = warp % cw, nw = warp / cw;
  int bid = block_index();
  const int mc = bid % a.m_chunks;
  bid /= a.m_chunks;
  const int cb = bid % a.col_blocks;
  const int split = bid / a.col_blocks;
  const int M = a.M, N = a.N, K = a.K;
  const int64_t half_k = K / 2;
  const int k0 = (cb * cw + ci) * kTtK;  // this warp's tile
  const bool col_ok = k0 < K;
  const int s_begin = static_cast<int>(static_cast<int64_t>(split) * a.steps / a.splits);
  const int s_end = static_cast<int>(static_cast<int64_t>(split + 1) * a.steps / a.splits);
  const int m0 = mc * MT * 8;

  // Table: entry b (low half: code of the high nibble) at b * 128, 32 copies;
  // 8 threads write one entry with 16-byte stores.
  for (int p = tid; p < 256 * 8; p += kTtThreads) {
    const int b = p >> 3;
    const uint32_t v = bits16<T>(ldg(a.code + (b >> 4))) | (bits16<T>(ldg(a.code + (b & 15))) << 16);
    sts<uint4>(smem + b * 128 + (p & 7) * 16, make_uint4(v, v, v, v));
  }
  float offset = 0.0f;
  if constexpr (NESTED) {
    for (int p = tid; p < 256; p += kTtThreads) sts<float>(smem + kLutBytes + 4 * p, ldg(a.s.nested_code + p));
    offset = ldg(a.s.offset);
  }
  syncthreads();
  const uint32_t lut = opaque(shared_addr(smem) + lane * 4);

  // Element offsets are 32-bit (the planner asks N * K < 2^32). Rows past N
  // load row 0 (a valid address, finite codes) and their g values are zeroed,
  // so they add exact zeros; rows of g past M load row 0 and only feed
  // output rows that are never stored. No branches.
  const uint32_t Ku = static_cast<uint32_t>(K);
  const uint8_t* wbase = a.packed + 4 * grp;
  const int srow = lane & 15;  // the row whose scale this lane loads
  // g rows this lane feeds to B (row m0 + 8j + grp; rows past M read row 0).
  const T* grow[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int m = m0 + 8 * j + grp;
    grow[j] = static_cast<const T*>(a.g) + static_cast<int64_t>(m < M ? m : 0) * N;
  }
  const bool g_vec = a.g_vec != 0;

  auto load_step = [&](int st, TtStep<MT, NESTED>& S) {
    const int nb = st * 16 + 4 * t;  // this lane's rows nb .. nb + 3
    const uint32_t e0 = static_cast<uint32_t>(nb) * Ku + static_cast<uint32_t>(k0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t e = nb + i < N ? e0 + static_cast<uint32_t>(i) * Ku : 0u;
      S.w[i] = ldg_stream4(wbase + (e >> 1));
    }
    S.rows_ok = nb < N;
    {
      // Rows past N take row 0's scale: finite, and their g values are 0.
      const int n = st * 16 + srow;
      const uint32_t blk = (n < N ? static_cast<uint32_t>(n) * Ku + static_cast<uint32_t>(k0) : 0u) >> a.block_shift;
      if constexpr (NESTED) {
        S.sq = ldg(a.s.absmax_q + blk);
        S.sa = ldg(a.s.nested_absmax + (blk >> a.s.nested_shift));
      } else {
        S.sa = ldg(a.s.absmax + blk);
      }
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      if (g_vec) {  // g[m][nb .. nb + 3] in one 8-byte load (N % 4 == 0: all in or all out)
        const uint2 r = ldg(reinterpret_cast<const uint2*>(grow[j] + (nb < N ? nb : 0)));
        S.gv[j][0] = r.x;
        S.gv[j][1] = r.y;
      } else {  // odd N: per value, zeroed here (this path waits for its loads)
        const uint16_t* g16 = reinterpret_cast<const uint16_t*>(grow[j]);
        uint32_t v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t r = ldg(g16 + (nb + i < N ? nb + i : 0));
          v[i] = nb + i < N ? r : 0u;
        }
        S.gv[j][0] = v[0] | (v[1] << 16);
        S.gv[j][1] = v[2] | (v[3] << 16);
      }
    }
  };

  float acc[MT][4][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][q][i] = 0.0f;

  auto compute = [&](const TtStep<MT, NESTED>& S) {
    // The scale of row lane % 16, then the scales of this lane's rows
    // 4t .. 4t + 3.
    float mine;
    if constexpr (NESTED)
      mine = fmul_rn(lds<float>(smem + kLutBytes + 4 * S.sq), S.sa) + offset;
    else
      mine = S.sa;
    float sc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[i] = shfl_idx(mine, 4 * t + i);
    // B = g * scale with packed 16-bit multiplies (the scale rounded to T
    // first): two instructions per m-tile instead of four fp32 multiplies,
    // four conversions and two packs. Against a float32 reference the result's
    // error is ~1.5x that of dequantize-to-T + matmul (fp32 multiplies:
    // ~1.2x); the tests' bound is 2x.
    const uint32_t sp[2] = {pack2<T>(sc[0], sc[1]), pack2<T>(sc[2], sc[3])};
    uint32_t b[MT][2];
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) b[j][h] = hmul2<T>(S.rows_ok ? S.gv[j][h] : 0u, sp[h]);
    // Merged bytes: high nibbles of rows (n, n+1) and low nibbles, for the
    // row pairs (4t, 4t+1) and (4t+2, 4t+3).
    const uint32_t hi01 = (S.w[0] & 0xF0F0F0F0u) | ((S.w[1] >> 4) & 0x0F0F0F0Fu);
    const uint32_t lo01 = ((S.w[0] << 4) & 0xF0F0F0F0u) | (S.w[1] & 0x0F0F0F0Fu);
    const uint32_t hi89 = (S.w[2] & 0xF0F0F0F0u) | ((S.w[3] >> 4) & 0x0F0F0F0Fu);
    const uint32_t lo89 = ((S.w[2] << 4) & 0xF0F0F0F0u) | (S.w[3] & 0x0F0F0F0Fu);
    auto tile = [&](auto jc) {
      constexpr int J = decltype(jc)::value;
      const uint32_t af[4] = {lut_at<J>(lut, hi01), lut_at<J>(lut, lo01), lut_at<J>(lut, hi89),
                              lut_at<J>(lut, lo89)};
#pragma unroll
      for (int j = 0; j < MT; ++j) mma16816<T>(acc[j][J], af, b[j][0], b[j][1]);
    };
    tile(std::integral_constant<int, 0>());
    tile(std::integral_constant<int, 1>());
    tile(std::integral_constant<int, 2>());
    tile(std::integral_constant<int, 3>());
  };

  // Each warp's steps: s_begin + nw, + nwarps, ...; the next one is loaded
  // before the current one is computed, and (a.pf > 0) the one a.pf steps
  // ahead is asked into L2 (one 32-byte segment per row, lanes 0..15).
  auto prefetch = [&](int st) {
    const int pf = st + a.pf * nwarps;
    if (a.pf > 0 && lane < 16 && pf < s_end && pf * 16 + lane < N)
      prefetch_l2(a.packed + static_cast<int64_t>(pf * 16 + lane) * half_k + k0 / 2);
  };
  if (col_ok) {
    if constexpr (MT == 1) {
      // Two step buffers used in turn (a loop body of two steps). With the
      // copy below, ncu (M = 1, 4096 x 11008) found 22% of the stall samples
      // on a register move of the copy, which waits for the load it copies.
      // On the H200 this form was 0-5% faster at M <= 8 and 2-13% slower at
      // M = 12..64, so only MT = 1 takes it.
      TtStep<MT, NESTED> s0, s1;
      int st = s_begin + nw;
      if (st < s_end) load_step(st, s0);
      for (; st < s_end; st += 2 * nwarps) {
        if (st + nwarps < s_end) load_step(st + nwarps, s1);
        prefetch(st);
        compute(s0);
        if (st + nwarps >= s_end) break;
        if (st + 2 * nwarps < s_end) load_step(st + 2 * nwarps, s0);
        prefetch(st + nwarps);
        compute(s1);
      }
    } else {
      TtStep<MT, NESTED> nxt;
      int st = s_begin + nw;
      if (st < s_end) load_step(st, nxt);
      for (; st < s_end; st += nwarps) {
        const TtStep<MT, NESTED> cur = nxt;
        if (st + nwarps < s_end) load_step(st + nwarps, nxt);
        prefetch(st);
        compute(cur);
      }
    }
  }

  // Sum the warps of each column in shared memory (the table is done with),
  // lane-contiguous: value v of warp w at ((w * MT * 16) + v) * 32 + lane.
  syncthreads();
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        sts<float>(smem + 4 * (((warp * MT + j) * 16 + q * 4 + i) * 32 + lane), acc[j][q][i]);
  syncthreads();
  // One item: a column warp's (m-tile j, m parity p, lane) -> the 8 k-values
  // k0 + 8 grp + [0, 8) of row m0 + 8j + 2t + p.
  for (int it = tid; it < cw * MT * 2 * 32; it += kTtThreads) {
    const int ln = it & 31;
    const int p = (it >> 5) & 1;
    const int j = (it >> 6) % MT;
    const int c = (it >> 6) / MT;
    const int kt = (cb * cw + c) * kTtK + 8 * (ln >> 2);
    const int m = m0 + 8 * j + 2 * (ln & 3) + p;
    if (kt >= K || m >= M) continue;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.0f;
    for (int w = c; w < kTtWarps; w += cw)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          v[2 * q + h] += lds<float>(smem + 4 * (((w * MT + j) * 16 + q * 4 + 2 * h + p) * 32 + ln));
    if (a.splits == 1) {
      const uint4 o = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                                 pack2<T>(v[6], v[7]));
      stg<uint4>(reinterpret_cast<uint4*>(static_cast<T*>(a.out) + static_cast<int64_t>(m) * K + kt), o);
    } else {
      float* dst = a.partial + (static_cast<int64_t>(split) * M + m) * K + kt;
      stg<float4>(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
      stg<float4>(reinterpret_cast<float4*>(dst + 4), make_float4(v[4], v[5], v[6], v[7]));
    }
  }
}

// Up to 128 registers: two blocks per SM; MT = 8 (128 accumulators per
// thread): one.
template <typename T, int MT, bool NESTED>
__global__ void __launch_bounds__(kTtThreads, MT == 8 ? 1 : 2) gemm_4bit_t_tc_kernel(const GemmTArgs a) {
  extern __shared__ __align__(16) uint8_t gemm_t_smem[];
  gemm_t_block<T, MT, NESTED>(a, gemm_t_smem);
}

// ---------------------------------------------------------------- launch shape (host)

struct GemmTPlan {
  bool ok = false;
  int mt = 1, cw = 2, col_blocks = 0, m_chunks = 0, splits = 1, steps = 0, smem = 0, pf = 0;
  int64_t blocks = 0;
};

// m-tiles of 8 rows of g per block (more rows take more m chunks); max_mt
// caps it (4 or 8).
inline int tt_mt(int M, int max_mt = 8) {
  const int mt = M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8;
  return mt < max_mt ? mt : max_mt;
}

// The launch shape for cw warps side by side along K (1, 2, 4 or 8).
inline GemmTPlan plan_gemm_t_cw(int M, int64_t N, int64_t K, int sms, int cw, int bps, int pf, int max_mt) {
  GemmTPlan p;
  p.mt = tt_mt(M, max_mt);
  p.cw = cw;
  const int64_t tiles = K / kTtK;
  p.col_blocks = static_cast<int>((tiles + p.cw - 1) / p.cw);
  p.m_chunks = (M + 8 * p.mt - 1) / (8 * p.mt);
  p.steps = static_cast<int>((N + 15) / 16);
  // Split N so that the blocks fill the resident slots in one wave (a second,
  // partial wave leaves SMs idle at the end), keeping at least two steps per
  // warp.
  const int64_t slots = static_cast<int64_t>(sms) * (bps > 0 ? bps : 1);
  const int64_t base = static_cast<int64_t>(p.col_blocks) * p.m_chunks;
  const int64_t per_split = 2 * (kTtWarps / p.cw);
  const int64_t max_splits = p.steps / per_split > 1 ? p.steps / per_split : 1;
  int64_t splits = slots / base;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  p.splits = static_cast<int>(splits);
  p.blocks = base * splits;
  if (p.blocks >= (int64_t{1} << 31)) return p;
  p.smem = tt_smem_bytes(p.mt);
  p.pf = pf > 0 ? pf : 0;
  p.ok = true;
  return p;
}

// The share of the resident slots a plan's last (or only) wave keeps busy.
inline double tt_fill(const GemmTPlan& p, int sms, int bps) {
  const int64_t slots = static_cast<int64_t>(sms) * (bps > 0 ? bps : 1);
  const int64_t waves = (p.blocks + slots - 1) / slots;
  return static_cast<double>(p.blocks) / static_cast<double>(waves * slots);
}

// cw: warps side by side along K (0: chosen here); bps: blocks of the
// instantiation that fit one SM; pf: the L2 prefetch distance in steps (<= 0:
// none; benchmarks only); max_mt: the largest m-tile count (8; 4 runs M > 32
// as several passes, for comparisons).
// - Two warps along K by default; four when that fills the slots clearly
//   better (a K with few 128-k columns, e.g. 8192 x 28672 at M <= 8: 224
//   blocks for 396 slots with two, 336 with four; 127 -> 107 us on the H200).
//   At equal fill two were faster (by 1-15 us at M >= 12, before the loads
//   fix of 35d0828). Re-measured after it: forcing either one everywhere was
//   slower than this rule on some shapes (by up to 13 us at M = 48).
// - No L2 prefetch: after 35d0828 the kernel was faster without it at 35 of
//   36 shape x M points (H200, 1-2 us on the smaller weights; a distance of
//   2 cost 12-28 us on 28672 x 8192 at every M).
inline GemmTPlan plan_gemm_t(int M, int64_t N, int64_t K, int64_t blocksize, int sms, int cw = 0, int bps = 2,
                             int pf = 0, int max_mt = 8) {
  // 32-bit element offsets: N * K < 2^32.
  if (M < 1 || N < 1 || K < kTtK || K % kTtK != 0 || blocksize < kTtK || N > (int64_t{1} << 30) ||
      K > (int64_t{1} << 30) || N * K >= (int64_t{1} << 32))
    return GemmTPlan{};
  if (cw == 1 || cw == 2 || cw == 4 || cw == 8) return plan_gemm_t_cw(M, N, K, sms, cw, bps, pf, max_mt);
  const GemmTPlan two = plan_gemm_t_cw(M, N, K, sms, 2, bps, pf, max_mt);
  const GemmTPlan four = plan_gemm_t_cw(M, N, K, sms, 4, bps, pf, max_mt);
  if (two.ok && four.ok && tt_fill(four, sms, bps) > tt_fill(two, sms, bps) + 0.05) return four;
  return two;
}

}  // namespace gemv
}  // namespace cuda
}  // namespace lowbit
