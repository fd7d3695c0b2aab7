#pragma once
// Decode-time forward 4-bit matmul (M = 1..8 rows of x): a memory-bound GEMV
// that streams the packed weight once, keeping many bytes in flight per SM.
//
// Shared with gemm_4bit_tc_kernel: the weight is the A operand of
// mma.sync m16n8k16 (16 weight rows per tile), x^T the B operand (the 8
// columns are the rows of x; columns >= M compute garbage that is never
// written); a packed byte becomes an A register through one shared lookup in
// a byte -> two-codes table replicated 32 times (one copy per bank); each mma
// step spans one quantization block, so the block's scale multiplies the fp32
// partial sum of the granule (min(blocksize, 128) k-values) and the codes stay
// exact.
//
// What changed against the tc kernel, which at M = 1 ran with one 8-warp block
// per SM (244 registers), double-buffered words in registers, and reached 31%
// of the DRAM bandwidth (too few bytes in flight):
//  - Work: a warp owns RT 16-row tiles ("a unit", 16 * RT weight rows) and a
//    contiguous range of 256-k "stages" along K. A block of W warps holds `rw`
//    units; the W / rw warps of a unit split its K range, and are summed in
//    shared memory in a fixed order (deterministic). Only when the units do not
//    fill the chip is K split across blocks as well (fp32 partials and
//    splitk_reduce_kernel, summed in split order).
//  - Data: every warp has its own ring of S stages in shared memory, fed with
//    cp.async (no registers held by loads in flight): per stage the x slice
//    [M, 256] and the stage's scale bytes, and (kAsync, kLut256) the weight
//    tile [16 * RT, 128 bytes] itself. Only __syncwarp orders a warp's ring;
//    the block synchronizes only around the table fill and the reduction.
//  - kRegs keeps the weight in registers instead (16-byte ld.global.nc, one
//    stage ahead, plus an L2 prefetch S - 1 stages ahead), with x and scales
//    in the ring.
//  - kLut256 is kAsync with the table at a 256-byte stride at a 64 KB-aligned
//    shared address, so that one byte permute forms each lookup address.
//
// Lane layout of a granule (GS = min(blocksize, 128) k-values of one row, GS/2
// bytes): lane t (0..3) of the row's 4-lane group owns bytes
// [t * GS/8, (t + 1) * GS/8), i.e. WPG = GS/32 words; word i covers k =
// c*GS + t*GS/4 + 8i + [0, 8) of the stage. Each word feeds two mma steps
// (bytes 0,1 then 2,3), and the lane's B registers are the matching 8 x values
// (one 16-byte load). So each mma step takes 4 k from each of the 4 lanes of
// a group, all in one granule, hence in one quantization block.
#include <cstdint>

#include "gemm/gemv_prims.cuh"
#include "quantize/quantize_kernels.cuh"

namespace lowbit {
namespace cuda {
namespace gemv {

// The kernels selectable with LOWBIT_GEMV_VARIANT (see gemm_cuda.cu).
enum class Variant : int {
  kTc = 0,     // the general fused tensor-core kernel (gemm_4bit_tc_kernel)
  kAsync = 1,  // cp.async ring for weight, x and scales
  kRegs = 2,   // weight in registers, x and scales through the ring
  kLut256 = 3, // kAsync with a 256-byte-stride table: one instruction less per lookup
};

constexpr int kMaxWarps = 8;
constexpr int kMaxThreads = kMaxWarps * 32;
constexpr int kMaxM = 8;
constexpr int kStageK = 256;               // k-values of a row per stage
constexpr int kStageRowBytes = kStageK / 2;
constexpr int kXRowBytes = kStageK * 2;    // one row of x per stage (16-bit)
constexpr int kLutBytes = 256 * 32 * 4;    // byte -> two codes, 32 copies
constexpr int kNestedCodeOff = kLutBytes;  // 256 floats of the nested code
constexpr int kRingOff = kNestedCodeOff + 256 * 4;
constexpr int kAlignPad = 1024;         // the kernel realigns its layout to 1 KB
// kLut256: the table at a 64 KB-aligned shared address, entry b at b * 256.
constexpr int kLut256Bytes = 256 * 256;
constexpr int kLut256Warps = 16;

struct GemvArgs {
  const void* x;          // [M, K], T, 16-byte aligned
  const uint8_t* packed;  // [N * K / 2], 16-byte aligned
  const float* code;      // [16]
  ScaleArgs s;
  int block_shift;        // log2(blocksize)
  int64_t nblocks;        // quantization blocks (bounds the 8-bit scale reads)
  const void* bias;       // [N], T, or nullptr (used when splits == 1)
  void* out;              // [M, N], T (splits == 1)
  float* partial;         // [splits, M, N] fp32 (splits > 1)
  int M, N, K;
  int units;              // 16 * RT-row units covering N
  int rw;                 // units per block; the block's W / rw warps split K
  int splits;             // blocks along K
  int stages;             // ring depth S (2 or 3)
  int stage_bytes;        // one stage of one warp's ring
};

// ---------------------------------------------------------------- layouts

// A ring stage: [weight tile (kAsync only)][x rows][scale bytes per row]
// [finished scales (nested only)]. All parts are multiples of 128 bytes.
template <int RT, int GS, bool NESTED, bool REGS>
struct StageLayout {
  static constexpr int kRows = 16 * RT;
  static constexpr int kWeightBytes = REGS ? 0 : kRows * kStageRowBytes;
  // Per row: nested: the 8-bit codes (4 bytes; 8 for blocksize 32) at 0, the
  // nested absmax at 8, and for GS = 128 the position of the first code in
  // its word at 12. Plain: the float scales of the stage (up to 8).
  static constexpr int kScaleRowBytes = GS == 32 ? 32 : 16;
  // Nested: the fp32 scale of each (row, granule), [kRows][256 / GS].
  static constexpr int kFinishedBytes = NESTED ? kRows * (kStageK / GS) * 4 : 0;
  __host__ __device__ static constexpr int x_off() { return kWeightBytes; }
  __host__ __device__ static constexpr int scale_off(int M) { return kWeightBytes + M * kXRowBytes; }
  __host__ __device__ static constexpr int finished_off(int M) { return scale_off(M) + kRows * kScaleRowBytes; }
  __host__ __device__ static constexpr int bytes(int M) { return (finished_off(M) + kFinishedBytes + 511) / 512 * 512; }
};

// Weight tile: 16-byte chunk q of row r is stored at chunk q ^ w_swizzle(r).
// The fragment reads of a quarter/half/full warp (16-, 8-, 4-byte reads for
// GS = 128, 64, 32) touch rows g (+8, +16, +24) for consecutive g: the
// swizzle gives rows g, g+1 different halves, rows g..g+3 different 32-byte
// pairs, rows g..g+7 different chunks, so none of them conflict. A cp.async
// of 8 lanes fills one row, permuted within it: no conflicts either.
__host__ __device__ constexpr int w_swizzle(int r) { return ((r & 1) << 2) | (r & 2) | ((r >> 2) & 1); }

// x tile: chunk q (8 k-values) of x row r. Lane t of a group reads chunks
// t * GS/32 + i (+ c * GS/8); the term from bit 3 of q spreads the four lanes
// over distinct chunks mod 8, the row bit separates the two rows (groups) of a
// quarter warp.
template <int GS>
__host__ __device__ constexpr int x_chunk(int r, int q) {
  return q ^ ((((q >> 3) & 1) << 1) | ((r & 1) * (GS == 32 ? 4 : 1)));
}

// StageLayout<...>::bytes(M) at run time (the host's view); a multiple of 512.
__host__ __device__ constexpr int stage_bytes(int rt, int gs, bool nested, bool regs, int M) {
  return ((regs ? 0 : 16 * rt * kStageRowBytes) + M * kXRowBytes + 16 * rt * (gs == 32 ? 32 : 16) +
          (nested ? 16 * rt * (kStageK / gs) * 4 : 0) + 511) / 512 * 512;
}

// The two codes of byte J of w for the calling lane; lut = the shared address
// of the table + lane * 4 (entry b at byte b * 128): a byte extract and one
// shift-add per lookup.
template <int J>
__host__ __device__ __forceinline__ uint32_t lut_at(uint32_t lut, uint32_t w) {
  return ld_shared<uint32_t>(lut + (byte_of<J>(w) << 7));
}

// The same with the 256-byte-stride table: lut = its shared address (bits
// 8..15 zero) + lane * 4, so one byte permute writes byte J of w into bits
// 8..15 of lut and yields the entry's address.
template <int J>
__host__ __device__ __forceinline__ uint32_t lut256_at(uint32_t lut, uint32_t w) {
#if defined(LOWBIT_GEMV_DEV)
  uint32_t a;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(a) : "r"(w), "r"(lut), "n"(0x7604 | (J << 4)));
  return ld_shared<uint32_t>(a);
#else
  return ld_shared<uint32_t>((lut & 0xFFFF00FFu) | (((w >> (8 * J)) & 0xFFu) << 8));
#endif
}

// ---------------------------------------------------------------- the kernel body

// NT, BX (the small-M kernel, M = 9..32): NT 8-column tiles of x per mma A
// fragment (each decoded weight fragment feeds NT mma), and x staged once per
// block (BX) in a block-wide ring instead of once per warp: all warps of a
// block then stream the same stages (rw = warps, no K split inside the block)
// and a stage advances with a block barrier.
template <typename T, int RT, int GS, bool NESTED, bool REGS, bool L256, int NT = 1, bool BX = false>
__host__ __device__ __forceinline__ void gemv_block(const GemvArgs& a, uint8_t* smem_raw) {
  static_assert(RT == 1 || RT == 2, "one or two 16-row tiles per warp");
  static_assert(NT == 1 || (BX && !REGS && !L256), "several x tiles: the block-staged x kernel only");
  static_assert(GS == 32 || GS == 64 || GS == 128, "granule of 32, 64 or 128 k-values");
  static_assert(!REGS || GS >= 64, "register variant: blocksize >= 64");
  static_assert(!L256 || (RT == 1 && !REGS), "256-byte table: kAsync with one tile per warp");
  using L = StageLayout<RT, GS, NESTED, REGS>;
  constexpr int G = kStageK / GS;       // granules per stage
  constexpr int WPG = GS / 32;          // words per lane, row and granule
  constexpr int ROWS = L::kRows;
  constexpr int SRB = L::kScaleRowBytes;
  constexpr int QW = GS == 32 ? 8 : 4;  // nested: code bytes copied per row and stage
  constexpr int GS_SHIFT = GS == 32 ? 5 : GS == 64 ? 6 : 7;
  constexpr int TB = GS / 8;            // bytes of a row per lane and granule

  // The layout starts at a 1 KB boundary of the shared window (the host
  // allocates kAlignPad more), so that XOR-swizzled offsets within a stage can
  // be applied to full addresses.
  uint32_t smem_s = shared_addr(smem_raw);
  const uint32_t pad = ((smem_s + (kAlignPad - 1)) & ~static_cast<uint32_t>(kAlignPad - 1)) - smem_s;
  uint8_t* smem = smem_raw + pad;
  smem_s += pad;

  const int tid = thread_index();
  const int nthreads = block_dim();
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = a.M, N = a.N, K = a.K;
  const int64_t half_k = K / 2;

  // Work of this warp: unit (rows row0 .. row0 + ROWS) and stages [s_begin, s_end).
  const int bid = block_index();
  const int split = bid % a.splits;
  const int rw = a.rw, kw = nwarps / rw;
  const int ru = warp % rw, kp = warp / rw;
  const int unit = (bid / a.splits) * rw + ru;
  int s_begin = 0, s_end = 0;
  // kp >= kw: warps past rw * kw (rw not dividing the warps) sit out. BX:
  // every warp takes the block's stages (units past N compute zeros), so that
  // all of them meet at each stage's barrier.
  if (BX || (unit < a.units && kp < kw)) {
    const int64_t total = K / kStageK, parts = static_cast<int64_t>(a.splits) * kw, part = split * kw + kp;
    s_begin = static_cast<int>(total * part / parts);
    s_end = static_cast<int>(total * (part + 1) / parts);
  }
  const int nst = s_end - s_begin;
  const int row0 = unit * ROWS;
  const int S = a.stages, SB = a.stage_bytes;
  // Shared layout (offsets from smem). Default: [table 32 KB][nested code
  // 1 KB][rings]. L256: rings below the first 64 KB-aligned address while
  // they fit, then [table 64 KB][nested code 1 KB][the other rings]; the
  // final reduction uses the table's unused upper 128 bytes of each entry.
  int ring_off, lut_off, ncode_off;
  if constexpr (L256) {
    const uint32_t lut_abs = (smem_s + (kLut256Bytes - 1)) & ~static_cast<uint32_t>(kLut256Bytes - 1);
    lut_off = static_cast<int>(lut_abs - smem_s);
    const int ring_bytes = S * SB;
    const int n_low = lut_off / ring_bytes;
    ring_off = warp < n_low ? warp * ring_bytes : lut_off + kLut256Bytes + 1024 + (warp - n_low) * ring_bytes;
    ncode_off = lut_off + kLut256Bytes;
  } else {
    lut_off = 0;
    ncode_off = kNestedCodeOff;
    ring_off = kRingOff + warp * S * SB;
  }
  // BX: x is not in the warp's stage but in the block's x ring, after every
  // warp's ring: S slots of M rows x 512 bytes.
  const int MX = BX ? 0 : M;
  const int x_off = L::x_off(), sc_off = L::scale_off(MX), fin_off = L::finished_off(MX);
  const int xring_off = kRingOff + nwarps * S * SB, XS = M * kXRowBytes;

  // ------------------------------------------------ producer: one stage into a ring slot
  // Lane constants of the copies: weight row 4j + l8, chunk q7 (8 lanes per
  // 128-byte row); x chunk = lane (one row of x per instruction).
  const int l8 = lane >> 3, q7 = lane & 7;
  const int wdst0 = l8 * kStageRowBytes + ((q7 ^ w_swizzle(l8)) << 4);
  const int wdst1 = l8 * kStageRowBytes + ((q7 ^ w_swizzle(4 + l8)) << 4);
  const int xdst0 = x_chunk<GS>(0, lane) << 4, xdst1 = x_chunk<GS>(1, lane) << 4;
  const T* xsrc = static_cast<const T*>(a.x) + lane * 8;
  auto issue = [&](int s, int slot) {
    uint8_t* st = smem + ring_off + slot * SB;
    if constexpr (!REGS) {
      const uint8_t* wsrc = a.packed + s * kStageRowBytes + q7 * 16;
#pragma unroll
      for (int j = 0; j < RT * 4; ++j) {
        const int row = row0 + 4 * j + l8;
        const int rc = row < N ? row : N - 1;  // rows past N: nothing read, zeros
        cp_async<16, false>(st + j * 4 * kStageRowBytes + (j & 1 ? wdst1 : wdst0), wsrc + rc * half_k,
                            row < N ? 16 : 0);
      }
    }
    if constexpr (BX) {
      // Rows warp, warp + nwarps, ... of x into the block's slot (nwarps is
      // even, so a warp's rows share a parity).
      uint8_t* xs = smem + xring_off + slot * XS + ((warp & 1) ? xdst1 : xdst0);
      const T* xp = xsrc + s * kStageK + static_cast<int64_t>(warp) * K;
#pragma unroll 1
      for (int m = warp; m < M; m += nwarps) {
        cp_async<16, true>(xs + m * kXRowBytes, xp, 16);
        xp += static_cast<int64_t>(nwarps) * K;
      }
    } else {
      // Row m of x goes to m * 512 + (xdst0, with the row-parity bit toggled
      // for odd m): one add and one xor per row.
      const T* xp = xsrc + s * kStageK;
      int xo = x_off + xdst0;  // x_off is a multiple of 512: the xor stays in bits 4..6
#pragma unroll 1
      for (int m = 0; m < M; ++m) {
        cp_async<16, true>(st + xo, xp, 16);
        xp += K;
        xo = (xo + kXRowBytes) ^ (xdst0 ^ xdst1);
      }
    }
    // Scales of the stage, one row per lane.
    if (lane < ROWS) {
      const int r = lane;
      const int row = row0 + r;
      const bool ok = row < N;
      const int64_t b0 = ((ok ? row : 0) * static_cast<int64_t>(K) + static_cast<int64_t>(s) * kStageK) >> a.block_shift;
      uint8_t* d = st + sc_off + r * SRB;
      if constexpr (NESTED) {
        if constexpr (GS == 128) {
          // The aligned word holding the stage's one or two codes; never read
          // past the end of the codes.
          const int64_t bw = b0 & ~int64_t{3};
          const int64_t left = a.nblocks - bw;
          cp_async<4, true>(d, a.s.absmax_q + bw, ok ? static_cast<int>(left < 4 ? left : 4) : 0);
        } else {
          // Blocksize 64 (32): the stage's 4 (8) codes, an aligned word.
          cp_async<QW, true>(d, a.s.absmax_q + b0, ok ? QW : 0);
        }
        cp_async<4, true>(d + 8, a.s.nested_absmax + (b0 >> a.s.nested_shift), ok ? 4 : 0);
        if constexpr (GS == 128) sts<uint32_t>(d + 12, static_cast<uint32_t>(b0 & 3));
      } else {
        const float* src = a.s.absmax + b0;
        if constexpr (GS == 32) {
          cp_async<16, true>(d, src, ok ? 16 : 0);
          cp_async<16, true>(d + 16, src + 4, ok ? 16 : 0);
        } else if constexpr (GS == 64) {
          cp_async<16, true>(d, src, ok ? 16 : 0);
        } else if (a.block_shift == 7) {
          cp_async<8, true>(d, src, ok ? 8 : 0);
        } else {
          cp_async<4, true>(d, src, ok ? 4 : 0);
        }
      }
    }
  };

  // ------------------------------------------------ kRegs: the weight words of a stage
  // wr[rt][h][e]: row 16rt + 8h + g, 64-byte half e of the stage row. GS =
  // 128: lane t loads bytes [16t, 16t + 16) of the half, its granule share as
  // is. GS = 64 (two blocks per half): lanes t load [32(t&1) + 16(t>>1), +16)
  // and each even/odd pair swaps 8 bytes (in consume), so that every lane
  // ends up with its 8-byte share of both blocks.
  const int woff = GS == 128 ? 16 * t : 32 * (t & 1) + 16 * (t >> 1);
  auto load_w = [&](int s, uint4 (&wr)[RT][2][2]) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * rt + 8 * h + g;
        // Rows past N read row 0: their results are never written.
        const uint8_t* p = a.packed + (row < N ? row : 0) * half_k + s * kStageRowBytes + woff;
#pragma unroll
        for (int e = 0; e < 2; ++e) wr[rt][h][e] = ldg_stream16(p + 64 * e);
      }
  };

  // ------------------------------------------------ consumer: decode + mma of one stage
  // Lane constants of the reads. The chunk index of every read is a lane part
  // OR a granule/word part on disjoint bits, and the swizzles are XORs, so
  // each address is (stage base + lane constant) ^ (compile-time constant);
  // stages are multiples of 512 bytes from a 1 KB-aligned base, so the XOR
  // (bits 4..8) stays within the stage.
  const uint32_t lut = opaque(smem_s + lut_off + lane * 4);
  const int swg = w_swizzle(g);  // rows 16rt + 8h + g all have (r & 7) == g
  const int fbase = g * kStageRowBytes + (((((t * TB) >> 4) ^ swg) << 4) | ((t * TB) & 15));
  // Column g of x tile j is row 8j + g of x; columns >= M read row 0 (never written).
  const int qt = t * (GS / 32);
  int xlane[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int xr = 8 * j + g < M ? 8 * j + g : 0;
    xlane[j] = xr * kXRowBytes + ((qt ^ (((qt >> 3) & 1) << 1) ^ ((xr & 1) * (GS == 32 ? 4 : 1))) << 4);
  }
  const int rel = a.block_shift - GS_SHIFT;  // granule -> scale index shift (GS = 128 only)
  const uint32_t ncode = smem_s + ncode_off;
  float offset = 0.0f;
  float acc[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][j][i] = 0.0f;

  auto consume = [&](int slot, const uint4 (&wr)[RT][2][2]) {
    const uint32_t st = smem_s + ring_off + slot * SB;
    // Scales of the lane's rows, per granule.
    float sc[RT][2][G];
    if constexpr (NESTED) {
      // Each (row, granule) scale is finished once, by one lane, into the
      // slot's fp32 area; then every lane reads its rows' scales as vectors.
      float* fin = reinterpret_cast<float*>(smem + ring_off + slot * SB + fin_off);
#pragma unroll
      for (int k = 0; k < ROWS * G / 32; ++k) {
        const int item = lane + 32 * k;
        const int c = item % G;
        const uint32_t sr = st + sc_off + (item / G) * SRB;
        int pos = c;
        if constexpr (GS == 128) pos = ld_shared_u8(sr + 12) + (c >> rel);
        const uint32_t q = ld_shared_u8(sr + pos);
        sts<float>(fin + item, fmul_rn(ld_shared<float>(ncode + 4 * q), ld_shared<float>(sr + 8)) + offset);
      }
      syncwarp();
      const uint32_t f = st + fin_off + g * G * 4;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t fr = f + (16 * rt + 8 * h) * G * 4;
          if constexpr (G == 2) {
            const float2 v = ld_shared<float2>(fr);
            sc[rt][h][0] = v.x, sc[rt][h][1] = v.y;
          } else {
#pragma unroll
            for (int c4 = 0; c4 < G; c4 += 4) {
              const float4 v = ld_shared<float4>(fr + 4 * c4);
              sc[rt][h][c4] = v.x, sc[rt][h][c4 + 1] = v.y, sc[rt][h][c4 + 2] = v.z, sc[rt][h][c4 + 3] = v.w;
            }
          }
        }
    } else {
      const uint32_t f = st + sc_off + g * SRB;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t sr = f + (16 * rt + 8 * h) * SRB;
          if constexpr (GS == 128) {
            const float2 v = ld_shared<float2>(sr);  // bs >= 256: only .x was copied
            sc[rt][h][0] = v.x;
            sc[rt][h][1] = rel == 0 ? v.y : v.x;
          } else {
#pragma unroll
            for (int c4 = 0; c4 < G; c4 += 4) {
              const float4 v = ld_shared<float4>(sr + 4 * c4);
              sc[rt][h][c4] = v.x, sc[rt][h][c4 + 1] = v.y, sc[rt][h][c4 + 2] = v.z, sc[rt][h][c4 + 3] = v.w;
            }
          }
        }
    }
    // kRegs, GS = 64: swap halves within lane pairs (see load_w).
    uint32_t ex[RT][2][2][4];
    if constexpr (REGS && GS == 64) {
      const bool odd = t & 1;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint4 v = wr[rt][h][e];
            const uint32_t r0 = shfl_xor(odd ? v.x : v.z, 1);
            const uint32_t r1 = shfl_xor(odd ? v.y : v.w, 1);
            // granule 2e (first block of the half), then 2e + 1
            ex[rt][h][e][0] = odd ? r0 : v.x;
            ex[rt][h][e][1] = odd ? r1 : v.y;
            ex[rt][h][e][2] = odd ? v.z : r0;
            ex[rt][h][e][3] = odd ? v.w : r1;
          }
    }
    const uint32_t wf = st + fbase;
    uint32_t xf[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xf[j] = (BX ? smem_s + xring_off + slot * XS : st + x_off) + xlane[j];
#pragma unroll
    for (int c = 0; c < G; ++c) {
      // Weight words of the granule.
      uint32_t wq[RT][2][WPG];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (REGS && GS == 128) {
            const uint4 v = wr[rt][h][c];
            wq[rt][h][0] = v.x, wq[rt][h][1] = v.y, wq[rt][h][2] = v.z, wq[rt][h][3] = v.w;
          } else if constexpr (REGS) {
#pragma unroll
            for (int i = 0; i < WPG; ++i) wq[rt][h][i] = ex[rt][h][c >> 1][2 * (c & 1) + i];
          } else {
            const uint32_t p = (wf ^ ((c * (GS / 32)) << 4)) + (16 * rt + 8 * h) * kStageRowBytes;
            if constexpr (GS == 128) {
              const uint4 v = ld_shared<uint4>(p);
              wq[rt][h][0] = v.x, wq[rt][h][1] = v.y, wq[rt][h][2] = v.z, wq[rt][h][3] = v.w;
            } else if constexpr (GS == 64) {
              const uint2 v = ld_shared<uint2>(p);
              wq[rt][h][0] = v.x, wq[rt][h][1] = v.y;
            } else {
              wq[rt][h][0] = ld_shared<uint32_t>(p);
            }
          }
        }
      float tmp[RT][NT][4];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) tmp[rt][j][i] = 0.0f;
#pragma unroll
      for (int i = 0; i < WPG; ++i) {
        // The word's 8 x values: chunk c*GS/8 + i (compile time) | t*GS/32 (lane).
        const int qc = c * (GS / 8) + i;
        uint4 xv[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) xv[j] = ld_shared<uint4>(xf[j] ^ ((qc ^ (((qc >> 3) & 1) << 1)) << 4));
#pragma unroll
        for (int u = 0; u < 2; ++u) {
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            uint32_t af[4];
            if (u == 0) {
              af[0] = (L256 ? lut256_at<0>(lut, wq[rt][0][i]) : lut_at<0>(lut, wq[rt][0][i]));
              af[1] = (L256 ? lut256_at<0>(lut, wq[rt][1][i]) : lut_at<0>(lut, wq[rt][1][i]));
              af[2] = (L256 ? lut256_at<1>(lut, wq[rt][0][i]) : lut_at<1>(lut, wq[rt][0][i]));
              af[3] = (L256 ? lut256_at<1>(lut, wq[rt][1][i]) : lut_at<1>(lut, wq[rt][1][i]));
            } else {
              af[0] = (L256 ? lut256_at<2>(lut, wq[rt][0][i]) : lut_at<2>(lut, wq[rt][0][i]));
              af[1] = (L256 ? lut256_at<2>(lut, wq[rt][1][i]) : lut_at<2>(lut, wq[rt][1][i]));
              af[2] = (L256 ? lut256_at<3>(lut, wq[rt][0][i]) : lut_at<3>(lut, wq[rt][0][i]));
              af[3] = (L256 ? lut256_at<3>(lut, wq[rt][1][i]) : lut_at<3>(lut, wq[rt][1][i]));
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
              mma16816<T>(tmp[rt][j], af, u ? xv[j].z : xv[j].x, u ? xv[j].w : xv[j].y);
          }
        }
      }
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[rt][j][0] = fmaf(tmp[rt][j][0], sc[rt][0][c], acc[rt][j][0]);
          acc[rt][j][1] = fmaf(tmp[rt][j][1], sc[rt][0][c], acc[rt][j][1]);
          acc[rt][j][2] = fmaf(tmp[rt][j][2], sc[rt][1][c], acc[rt][j][2]);
          acc[rt][j][3] = fmaf(tmp[rt][j][3], sc[rt][1][c], acc[rt][j][3]);
        }
    }
  };

  // ------------------------------------------------ prologue
  // The first S - 1 stages are requested before the table fill, so the fill
  // runs under the memory latency. Every iteration commits a group (empty
  // ones too), so "all but the newest S - 2 groups" is always the next stage.
  for (int i = 0; i < S - 1; ++i) {
    if (i < nst) issue(s_begin + i, i);
    cp_async_commit();
  }
  uint4 wnext[RT][2][2], wcur[RT][2][2];
  if constexpr (REGS) {
    if (nst > 0) load_w(s_begin, wnext);
  }
  // Table: entry b (low half: code of the high nibble, the earlier element),
  // 32 copies; 8 threads write one entry's 128 bytes with 16-byte stores.
  for (int p = tid; p < 256 * 8; p += nthreads) {
    const int b = p >> 3;
    const uint32_t v = bits16<T>(ldg(a.code + (b >> 4))) | (bits16<T>(ldg(a.code + (b & 15))) << 16);
    sts<uint4>(smem + lut_off + b * (L256 ? 256 : 128) + (p & 7) * 16, make_uint4(v, v, v, v));
  }
  if constexpr (NESTED) {
    for (int p = tid; p < 256; p += nthreads) sts<float>(smem + ncode_off + 4 * p, ldg(a.s.nested_code + p));
    offset = ldg(a.s.offset);
  }
  syncthreads();

  // ------------------------------------------------ main loop
  int rd = 0, wrs = S - 1;
  for (int i = 0; i < nst; ++i) {
    if (S == 3)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    // Every lane's copies of stage i landed; every lane is done with slot wrs
    // (BX: every warp's, since the x slot is shared).
    if constexpr (BX)
      syncthreads();
    else
      syncwarp();
    if (i + S - 1 < nst) issue(s_begin + i + S - 1, wrs);
    cp_async_commit();
    if constexpr (REGS) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) wcur[rt][h][e] = wnext[rt][h][e];
      if (i + 1 < nst) load_w(s_begin + i + 1, wnext);
      if (lane < ROWS && i + S - 1 < nst && row0 + lane < N)
        prefetch_l2(a.packed + (row0 + lane) * half_k + (s_begin + i + S - 1) * kStageRowBytes);
    }
    consume(rd, wcur);
    rd = rd + 1 == S ? 0 : rd + 1;
    wrs = wrs + 1 == S ? 0 : wrs + 1;
  }
  cp_async_wait<0>();

  // ------------------------------------------------ reduction over the K-split warps
  syncthreads();  // all rings are idle: reuse them
  // Float i of the reduction buffer: after the table (default), or in the
  // upper half of table entry i / 32 (L256; 16 warps x 128 floats fit).
  auto red_at = [&](int i) -> uint8_t* {
    if constexpr (L256) return smem + lut_off + (i >> 5) * 256 + 128 + (i & 31) * 4;
    return smem + kRingOff + 4 * i;
  };
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        sts<float>(red_at((((warp * RT + rt) * NT + j) * 4 + i) * 32 + lane), acc[rt][j][i]);
  syncthreads();
  constexpr int PER_UNIT = RT * NT * 4 * 32;
  for (int q = tid; q < rw * PER_UNIT; q += nthreads) {
    const int u = q / PER_UNIT, rem = q % PER_UNIT;
    const int rt = rem / (NT * 128), j = (rem / 128) % NT, i = (rem / 32) & 3, ln = rem & 31;
    float v = 0.0f;
    for (int k = 0; k < kw; ++k) v += lds<float>(red_at(((((u + k * rw) * RT + rt) * NT + j) * 4 + i) * 32 + ln));
    const int un = (bid / a.splits) * rw + u;
    const int row = un * ROWS + 16 * rt + (ln >> 2) + 8 * (i >> 1);
    const int m = 8 * j + 2 * (ln & 3) + (i & 1);
    if (un >= a.units || row >= N || m >= M) continue;
    if (a.splits == 1) {
      if (a.bias) v += static_cast<float>(ldg(static_cast<const T*>(a.bias) + row));
      stg<T>(static_cast<T*>(a.out) + static_cast<int64_t>(m) * N + row, T(v));
    } else {
      stg<float>(a.partial + (static_cast<int64_t>(split) * M + m) * N + row, v);
    }
  }
}

// RT = 1: two 8-warp blocks per SM (128 registers). RT = 2 (stages twice as
// large): two 4-warp blocks or one 8-warp block per SM, as the planner finds
// more warps busy; up to 255 registers, which the two tiles' fragments need.
template <int RT>
constexpr int min_blocks() {
  return RT == 1 ? 2 : 1;
}

// L256: one 16-warp block per SM (64 KB of table), 128 registers as well.
template <typename T, int RT, int GS, bool NESTED, bool REGS, bool L256>
__global__ void __launch_bounds__(L256 ? kLut256Warps * 32 : kMaxThreads, L256 ? 1 : min_blocks<RT>())
    gemv_4bit_kernel(const GemvArgs a) {
  extern __shared__ __align__(1024) uint8_t gemv_smem[];
  gemv_block<T, RT, GS, NESTED, REGS, L256>(a, gemv_smem);
}

// The small-M kernel (M = 9..32): NT x tiles, x staged per block, two 16-row
// tiles per warp, so each x fragment read from shared memory feeds 2 * NT
// mma (one tile per warp reads x twice as often per weight byte: 2-13% slower
// on the H100, NOTES_gemm v4). 8-warp blocks, one per SM, up to 255 registers.
constexpr int kBxMaxM = 32;  // rows of x per launch
constexpr int kBxWarps = 8;
constexpr int kBxRt = 2;
template <typename T, int GS, bool NESTED, int NT>
__global__ void __launch_bounds__(kBxWarps * 32, 1) gemm_4bit_bx_kernel(const GemvArgs a) {
  extern __shared__ __align__(1024) uint8_t gemv_smem[];
  gemv_block<T, kBxRt, GS, NESTED, false, false, NT, true>(a, gemv_smem);
}

// ---------------------------------------------------------------- launch shape (host)

struct GemvPlan {
  bool ok = false;
  int rt = 1, gs = 128;
  bool regs = false;
  bool lut256 = false;
  int nt = 1;       // x tiles of 8 rows (the small-M kernel: 2 or 4)
  bool bx = false;  // the small-M kernel
  int warps = kMaxWarps;
  int stages = 3;
  int stage_bytes = 0;
  int smem = 0;           // dynamic shared memory per block
  int blocks_per_sm = 0;  // by shared memory
  int units = 0, rw = 1, splits = 1, blocks = 0;
};

// sms, smem_per_sm, smem_per_block: the device's multiprocessors, shared
// memory per SM and the opt-in maximum per block.
inline GemvPlan plan_gemv(Variant v, int M, int64_t N, int64_t K, int64_t blocksize, bool nested, int sms,
                          int smem_per_sm, int smem_per_block) {
  GemvPlan p;
  if (v == Variant::kTc || M < 1 || M > kMaxM || N < 1 || K < kStageK || K % kStageK != 0) return p;
  p.gs = static_cast<int>(blocksize < 128 ? blocksize : 128);
  p.regs = v == Variant::kRegs && p.gs >= 64;
  // Two tiles per warp above M = 4: each x value loaded into the ring then
  // feeds 32 weight rows, halving the x traffic from L2 (at M = 8 it would
  // otherwise be twice the weight stream).
  p.rt = M > 4 ? 2 : 1;
  // Ring depth 3 (two stages in flight per warp) and 8 warps per block (one
  // table fill for 8 warps) if two such blocks fit an SM; else fewer stages,
  // then fewer warps; else the first configuration that fits at all.
  p.lut256 = v == Variant::kLut256 && p.rt == 1;
  if (p.lut256) {
    // One block per SM: 16 warps if they fit (64 KB table, nested code, the
    // rings, and one ring of slack for the part below the table it may waste).
    const int configs[4][2] = {{kLut256Warps, 3}, {kLut256Warps, 2}, {8, 3}, {8, 2}};
    for (const auto& cfg : configs) {
      const int warps = cfg[0], stages = cfg[1];
      const int sb = stage_bytes(1, p.gs, nested, false, M);
      const int smem = kAlignPad + kLut256Bytes + 1024 + (warps + 1) * stages * sb;
      if (smem > smem_per_block || smem + 1024 > smem_per_sm) continue;
      p.warps = warps, p.stages = stages, p.stage_bytes = sb, p.smem = smem, p.blocks_per_sm = 1;
      break;
    }
  } else {
    // Among the shapes that fit, the one that keeps the most warps busy on
    // this N (blocks beyond the resident slots wait), then the deeper ring.
    const int configs[4][2] = {{8, 3}, {8, 2}, {4, 3}, {4, 2}};
    const int64_t units = (N + 16 * p.rt - 1) / (16 * p.rt);
    int64_t best = -1;
    for (const auto& cfg : configs) {
      const int warps = cfg[0], stages = cfg[1];
      const int sb = stage_bytes(p.rt, p.gs, nested, p.regs, M);
      const int ring = warps * stages * sb;
      const int red = warps * p.rt * 4 * 32 * 4;  // the final reduction reuses the rings
      const int smem = kAlignPad + kRingOff + (ring > red ? ring : red);
      if (smem > smem_per_block) continue;
      int bps = smem_per_sm / (smem + 1024);  // 1 KB reserved per block
      const int cap = p.rt == 1 ? 2 : 8 / warps;  // the kernels' launch bounds
      if (bps > cap) bps = cap;
      if (bps < 1) continue;
      const int64_t slots = static_cast<int64_t>(sms) * bps;
      const int64_t busy = (units < slots ? units : slots) * warps;
      if (busy > best) {
        best = busy;
        p.warps = warps, p.stages = stages, p.stage_bytes = sb, p.smem = smem, p.blocks_per_sm = bps;
      }
    }
  }
  if (p.blocks_per_sm < 1) return p;
  const int64_t T = K / kStageK;
  p.units = static_cast<int>((N + 16 * p.rt - 1) / (16 * p.rt));
  const int64_t slots = static_cast<int64_t>(sms) * p.blocks_per_sm;
  // More units per block (fewer warps per unit) while each warp would
  // otherwise stream fewer than 8 stages and the blocks still fill every
  // slot, or when that turns two waves of blocks into one that still fills
  // three quarters of the slots (idle SMs are idle issue slots).
  int rw = 1;
  while (rw < p.warps && p.warps % (2 * rw) == 0) {  // rw divides the warps: every warp has a share of K
    const int64_t blocks_now = (p.units + rw - 1) / rw, blocks_next = (p.units + 2 * rw - 1) / (2 * rw);
    const bool few_stages = T / (p.warps / rw) < 8 && blocks_next >= slots;
    const bool one_wave = blocks_now > slots && blocks_next <= slots && blocks_next * 4 >= slots * 3;
    if (!few_stages && !one_wave) break;
    rw *= 2;
  }
  p.rw = rw;
  const int64_t blocks = (p.units + rw - 1) / rw;
  // Split K across blocks only when the units leave a quarter of the SMs idle
  // (the split costs a partial buffer and a second launch), and never past
  // one wave of blocks.
  int64_t splits = 1;
  if (blocks * 4 < static_cast<int64_t>(sms) * 3) {
    const int64_t kw = p.warps / rw;
    const int64_t max_splits = T / kw > 1 ? T / kw : 1;
    splits = (sms + blocks - 1) / blocks;
    if (splits * blocks > slots) splits = slots / blocks > 1 ? slots / blocks : 1;
    if (splits > max_splits) splits = max_splits;
  }
  p.splits = static_cast<int>(splits);
  if (blocks * splits >= (int64_t{1} << 31)) return p;
  p.blocks = static_cast<int>(blocks * splits);
  p.ok = true;
  return p;
}

// The small-M kernel's launch shape (M = 9..32). Each warp streams two
// 16-row tiles over the block's K range; a block holds kBxWarps warps (or
// half as many when shared memory is short), all on the same stages, and x
// is staged once per block and stage. K is
// split across blocks (fp32 partials and splitk_reduce_kernel) until the
// blocks cover the SMs, keeping at least two stages per block.
inline GemvPlan plan_gemm_bx(int M, int64_t N, int64_t K, int64_t blocksize, bool nested, int sms, int smem_per_sm,
                             int smem_per_block) {
  GemvPlan p;
  if (M <= kMaxM || M > kBxMaxM || N < 1 || K < kStageK || K % kStageK != 0) return p;
  constexpr int rt = kBxRt;
  p.gs = static_cast<int>(blocksize < 128 ? blocksize : 128);
  p.rt = rt;
  p.bx = true;
  p.nt = M <= 16 ? 2 : 4;
  const int sb = stage_bytes(rt, p.gs, nested, false, 0), xs = M * kXRowBytes;
  const int configs[4][2] = {{kBxWarps, 3}, {kBxWarps, 2}, {kBxWarps / 2, 3}, {kBxWarps / 2, 2}};
  for (const auto& cfg : configs) {
    const int warps = cfg[0], stages = cfg[1];
    const int ring = warps * stages * sb + stages * xs, red = warps * rt * p.nt * 4 * 32 * 4;
    const int smem = kAlignPad + kRingOff + (ring > red ? ring : red);
    if (smem > smem_per_block || smem + 1024 > smem_per_sm) continue;
    p.warps = warps, p.stages = stages, p.stage_bytes = sb, p.smem = smem, p.blocks_per_sm = 1;
    break;
  }
  if (p.blocks_per_sm < 1) return p;
  const int64_t T = K / kStageK;
  p.units = static_cast<int>((N + 16 * rt - 1) / (16 * rt));
  p.rw = p.warps;
  const int64_t blocks = (p.units + p.rw - 1) / p.rw;
  int64_t splits = 1;
  if (blocks < sms) {
    splits = sms / blocks;
    if (splits > T / 2) splits = T / 2 > 1 ? T / 2 : 1;
  }
  p.splits = static_cast<int>(splits);
  if (blocks * splits >= (int64_t{1} << 31)) return p;
  p.blocks = static_cast<int>(blocks * splits);
  p.ok = true;
  return p;
}

}  // namespace gemv
}  // namespace cuda
}  // namespace lowbit
