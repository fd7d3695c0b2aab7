// Runs the decode GEMV kernel body (csrc/gemm/gemv_kernels.cuh) and the
// transposed tensor-core kernel body (csrc/gemm/gemm_t_kernels.cuh) on the host,
// for machines without a GPU: every thread of a block is a cooperative fiber
// (ucontext); the collective primitives (mma.sync, shuffles, __syncwarp,
// __syncthreads) are emulated by switching fibers until the warp or block has
// arrived. cp.async copies land either at issue ("early") or only at the
// cp.async.wait_group that covers them ("late"), and runnable fibers are
// picked at random, so a read of a ring slot that is not yet (or no longer)
// owned shows up as a wrong result. Global and shared accesses of the kernel
// are bounds-checked against the tensors handed to it.
//
// Build and run (CPU only):
//   bash tests/cpp/run_gemv_emulator.sh            # all cases
//   bash tests/cpp/run_gemv_emulator.sh --quick    # a subset
//   bash tests/cpp/run_gemv_emulator.sh --tt [--quick]  # the transposed kernel only
#define LOWBIT_GEMV_EMULATE 1
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gemm/gemm_t_kernels.cuh"
#include "gemm/gemv_kernels.cuh"

namespace lowbit {
namespace cuda {
namespace gemv {
namespace emu {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "EMULATOR ERROR: %s\n", msg.c_str());
  std::abort();
}

struct Alloc {
  const uint8_t* p;
  size_t n;
  bool writable;
};

struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  int bytes, src_bytes;
};

enum Wait { kRun = 0, kWarp = 1, kBlock = 2 };

struct Lane {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  Wait wait = kRun;
  int op = 0;  // which collective the lane waits in (must agree across the warp)
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

struct WarpX {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  uint32_t v[32];
};

struct State {
  std::vector<Alloc> allocs;
  uint8_t* smem = nullptr;
  size_t smem_bytes = 0;
  int bid = 0, nthreads = 0, cur = 0;
  bool late = false;
  std::mt19937 rng{1};
  std::vector<Lane> lanes;
  std::vector<WarpX> wx;
  ucontext_t sched;
  std::function<void()> body;
  long switches = 0;
};

State S;

int thread_index() { return S.cur; }
int block_index() { return S.bid; }
int block_dim() { return S.nthreads; }

void check_global(const void* p, int bytes, bool write) {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  for (const Alloc& a : S.allocs)
    if (q >= a.p && q + bytes <= a.p + a.n) {
      if (write && !a.writable) fail("write to a read-only tensor");
      return;
    }
  fail("global access out of bounds (" + std::to_string(bytes) + " bytes at " +
       std::to_string(reinterpret_cast<uintptr_t>(p)) + ")");
}

void check_shared(const void* p, int bytes) {
  const uint8_t* q = static_cast<const uint8_t*>(p);
  if (q < S.smem || q + bytes > S.smem + S.smem_bytes) fail("shared access out of bounds");
  if (reinterpret_cast<uintptr_t>(q) % bytes != 0) fail("misaligned shared access");
}

// The emulated shared window: offsets into the block's buffer, starting at
// 0x400 like the dynamic shared memory of sm_90, or at 0x430 (aligned to 16
// bytes only, which exercises the kernel's realignment).
uint32_t kSharedBase = 0x400;
uint32_t shared_addr(const void* p) {
  check_shared(p, 1);
  return kSharedBase + static_cast<uint32_t>(static_cast<const uint8_t*>(p) - S.smem);
}
const void* shared_ptr(uint32_t a, int bytes) {
  const uint8_t* p = S.smem + (a - kSharedBase);
  check_shared(p, bytes);
  return p;
}

static void yield(Wait w, int op) {
  Lane& L = S.lanes[S.cur];
  L.wait = w;
  L.op = op;
  ++S.switches;
  swapcontext(&L.ctx, &S.sched);
}

void syncwarp() { yield(kWarp, 1); }
void syncthreads() { yield(kBlock, 2); }

uint32_t shfl_xor(uint32_t v, int mask) {
  WarpX& W = S.wx[S.cur / 32];
  const int l = S.cur % 32;
  W.v[l] = v;
  yield(kWarp, 3);
  const uint32_t r = W.v[l ^ mask];
  yield(kWarp, 4);
  return r;
}

uint32_t shfl_idx(uint32_t v, int src) {
  WarpX& W = S.wx[S.cur / 32];
  const int l = S.cur % 32;
  W.v[l] = v;
  yield(kWarp, 7);
  const uint32_t r = W.v[src & 31];
  yield(kWarp, 8);
  return r;
}

static void perform(const Copy& c) {
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.bytes > c.src_bytes) std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: bad src-size");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async: misaligned address");
  check_shared(dst, bytes);
  if (src_bytes > 0) check_global(src, src_bytes, false);
  Copy c{static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes, src_bytes};
  if (S.late)
    S.lanes[S.cur].open.push_back(c);
  else
    perform(c);
}

void cp_async_commit() {
  Lane& L = S.lanes[S.cur];
  L.groups.push_back(std::move(L.open));
  L.open.clear();
}

void cp_async_wait(int pending) {
  Lane& L = S.lanes[S.cur];
  while (static_cast<int>(L.groups.size()) > pending) {
    for (const Copy& c : L.groups.front()) perform(c);
    L.groups.erase(L.groups.begin());
  }
}

static float half_value(bool bf16, uint32_t bits) {
  return bf16 ? from_bits16<c10::BFloat16>(bits) : from_bits16<c10::Half>(bits);
}

void mma16816(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpX& W = S.wx[S.cur / 32];
  const int l = S.cur % 32;
  for (int i = 0; i < 4; ++i) W.a[l][i] = a[i], W.c[l][i] = d[i];
  W.b[l][0] = b0, W.b[l][1] = b1;
  yield(kWarp, 5);
  // A (16 x 16, row-major fragments), B (16 x 8), the PTX ISA's m16n8k16 layout.
  auto A = [&](int r, int k) {
    const int tk = (k & 7) >> 1, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_value(bf16, (W.a[(r & 7) * 4 + tk][reg] >> (16 * (k & 1))) & 0xFFFF);
  };
  auto B = [&](int k, int n) {
    const int tk = (k & 7) >> 1;
    return half_value(bf16, (W.b[n * 4 + tk][k >= 8 ? 1 : 0] >> (16 * (k & 1))) & 0xFFFF);
  };
  const int g = l >> 2, t = l & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
    float s = W.c[l][i];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[i] = s;
  }
  yield(kWarp, 6);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

static void lane_entry() {
  S.body();
  S.lanes[S.cur].done = true;
  if (!S.lanes[S.cur].open.empty()) fail("cp.async issued but never committed");
  for (const auto& gr : S.lanes[S.cur].groups)
    if (!gr.empty()) fail("thread exited with cp.async groups in flight");
}

// Runs one block: nthreads fibers executing body until all are done.
void run_block(int bid, int nthreads, const std::function<void()>& body) {
  S.bid = bid;
  S.nthreads = nthreads;
  S.body = body;
  S.lanes.assign(nthreads, Lane());
  S.wx.assign((nthreads + 31) / 32, WarpX());
  for (int i = 0; i < nthreads; ++i) {
    Lane& L = S.lanes[i];
    L.stack.resize(256 << 10);
    getcontext(&L.ctx);
    L.ctx.uc_stack.ss_sp = L.stack.data();
    L.ctx.uc_stack.ss_size = L.stack.size();
    L.ctx.uc_link = &S.sched;
    makecontext(&L.ctx, lane_entry, 0);
  }
  std::vector<int> runnable, ready;
  // Warps whose 32 lanes all wait in the same collective.
  auto ready_warps = [&] {
    ready.clear();
    for (int w = 0; w * 32 < nthreads; ++w) {
      bool all = true;
      for (int l = 0; l < 32; ++l) {
        const Lane& L = S.lanes[w * 32 + l];
        all &= !L.done && L.wait == kWarp && L.op == S.lanes[w * 32].op;
      }
      if (all) ready.push_back(w);
    }
  };
  for (;;) {
    runnable.clear();
    for (int i = 0; i < nthreads; ++i)
      if (!S.lanes[i].done && S.lanes[i].wait == kRun) runnable.push_back(i);
    // Now and then a ready warp goes on while other lanes still have work
    // before their next barrier, so warps drift apart: a missing block
    // barrier shows as one warp reading what another has not written yet.
    if (!runnable.empty() && S.rng() % 4 == 0) {
      ready_warps();
      if (!ready.empty()) {
        const int w = ready[std::uniform_int_distribution<int>(0, static_cast<int>(ready.size()) - 1)(S.rng)];
        for (int l = 0; l < 32; ++l) S.lanes[w * 32 + l].wait = kRun;
        continue;
      }
    }
    if (!runnable.empty()) {
      S.cur = runnable[std::uniform_int_distribution<int>(0, static_cast<int>(runnable.size()) - 1)(S.rng)];
      swapcontext(&S.sched, &S.lanes[S.cur].ctx);
      continue;
    }
    bool all_done = true, released = false;
    for (int i = 0; i < nthreads; ++i) all_done &= S.lanes[i].done;
    if (all_done) break;
    // Otherwise one ready warp, chosen at random, goes on.
    ready_warps();
    if (!ready.empty()) {
      const int w = ready[std::uniform_int_distribution<int>(0, static_cast<int>(ready.size()) - 1)(S.rng)];
      for (int l = 0; l < 32; ++l) S.lanes[w * 32 + l].wait = kRun;
      released = true;
    }
    if (released) continue;
    bool all_block = true;
    for (int i = 0; i < nthreads; ++i) all_block &= !S.lanes[i].done && S.lanes[i].wait == kBlock;
    if (all_block) {
      for (int i = 0; i < nthreads; ++i) S.lanes[i].wait = kRun;
      continue;
    }
    fail("deadlock: divergent barrier or collective");
  }
}

}  // namespace emu
}  // namespace gemv
}  // namespace cuda
}  // namespace lowbit

// ---------------------------------------------------------------- test driver

using namespace lowbit::cuda::gemv;
namespace emu = lowbit::cuda::gemv::emu;

// Host buffers, 64-byte aligned and sized exactly (the bounds checks use
// these sizes), freed with their owner.
struct HostBufs {
  std::vector<void*> owned;
  uint8_t* get(size_t n) {
    void* q = std::aligned_alloc(64, (n + 63) / 64 * 64);
    owned.push_back(q);
    return static_cast<uint8_t*>(q);
  }
  ~HostBufs() {
    for (void* q : owned) std::free(q);
  }
};

// Lets the emulated kernel read (or write) n bytes at q.
static void reg_alloc(const void* q, size_t n, bool writable) {
  if (q) emu::S.allocs.push_back({static_cast<const uint8_t*>(q), n, writable});
}

// A random 4-bit weight [N, K] as the kernels take it: packed bytes, a
// slightly perturbed 16-value code, plain or nested scales (nested blocks of
// 256, offset 1.5).
struct EmuWeight {
  int64_t numel, nblocks, nnested;
  int shift = 0;  // log2(blocksize)
  uint8_t* packed;
  float* code;
  float* absmax = nullptr;
  uint8_t* absmax_q = nullptr;
  float* nested_absmax = nullptr;
  float* nested_code = nullptr;
  float* offset = nullptr;

  EmuWeight(HostBufs& B, std::mt19937_64& rng, std::normal_distribution<float>& nd, int N, int K, int bs, bool nested) {
    std::uniform_int_distribution<int> byte(0, 255);
    numel = static_cast<int64_t>(N) * K;
    nblocks = (numel + bs - 1) / bs;
    nnested = (nblocks + 255) / 256;
    while ((1 << shift) < bs) ++shift;
    packed = B.get(numel / 2);
    for (int64_t i = 0; i < numel / 2; ++i) packed[i] = static_cast<uint8_t>(byte(rng));
    code = reinterpret_cast<float*>(B.get(64));
    for (int i = 0; i < 16; ++i) code[i] = -1.0f + 2.0f * i / 15.0f + 0.01f * nd(rng);
    if (nested) {
      absmax_q = B.get(nblocks);
      for (int64_t i = 0; i < nblocks; ++i) absmax_q[i] = static_cast<uint8_t>(byte(rng));
      nested_absmax = reinterpret_cast<float*>(B.get(4 * nnested));
      for (int64_t i = 0; i < nnested; ++i) nested_absmax[i] = 0.5f + std::fabs(nd(rng));
      nested_code = reinterpret_cast<float*>(B.get(4 * 256));
      for (int i = 0; i < 256; ++i) nested_code[i] = -1.0f + 2.0f * i / 255.0f;
      offset = reinterpret_cast<float*>(B.get(4));
      *offset = 1.5f;
    } else {
      absmax = reinterpret_cast<float*>(B.get(4 * nblocks));
      for (int64_t i = 0; i < nblocks; ++i) absmax[i] = 0.5f + std::fabs(nd(rng));
    }
  }

  lowbit::cuda::ScaleArgs scale_args() const {
    lowbit::cuda::ScaleArgs s{};
    if (absmax_q) {
      s.absmax_q = absmax_q;
      s.nested_absmax = nested_absmax;
      s.nested_code = nested_code;
      s.offset = offset;
      s.nested_shift = 8;
    } else {
      s.absmax = absmax;
    }
    return s;
  }

  // The scale of quantization block blk, as the kernels compute it.
  float scale(int64_t blk) const {
    return absmax_q ? fmul_rn(nested_code[absmax_q[blk]], nested_absmax[blk >> 8]) + *offset : absmax[blk];
  }

  // The code of element e.
  int nibble(int64_t e) const { return (e & 1) ? (packed[e >> 1] & 15) : (packed[e >> 1] >> 4); }

  void register_allocs() const {
    reg_alloc(packed, numel / 2, false);
    reg_alloc(code, 64, false);
    reg_alloc(absmax, absmax ? 4 * nblocks : 0, false);
    reg_alloc(absmax_q, absmax_q ? nblocks : 0, false);
    reg_alloc(nested_absmax, nested_absmax ? 4 * nnested : 0, false);
    reg_alloc(nested_code, nested_code ? 4 * 256 : 0, false);
    reg_alloc(offset, offset ? 4 : 0, false);
  }
};

// The block's shared memory: at the same offset modulo 1 KB as its emulated
// shared address (as generic and shared addresses of the device agree
// there), which is 0x400 (aligned as on sm_90) or 0x430 (only to 16 bytes),
// by the seed; filled with garbage where nothing was written.
struct EmuSmem {
  std::vector<uint8_t> store;
  uint8_t* p;
  EmuSmem(size_t bytes, uint64_t seed, bool late) : store(bytes + 2048) {
    const uint32_t base = (seed & 1) ? 0x400 : 0x430;
    p = store.data() + (1024 - reinterpret_cast<uintptr_t>(store.data()) % 1024) % 1024 + (base & 1023);
    emu::S.smem = p;
    emu::S.smem_bytes = bytes;
    emu::S.late = late;
    emu::kSharedBase = base;
    emu::S.rng.seed(static_cast<uint32_t>(seed));
    std::memset(p, 0xA5, bytes);
  }
};

struct Case {
  bool bf16;
  bool nested;
  int bs;
  Variant variant;
  int M, N, K;
  int sms;
  bool bias;
  bool late;
  int warps_override;  // 0: the planner's choice
  bool deep;           // one warp per unit (rw = warps): long per-warp pipelines
  bool bx;             // the small-M kernel (M = 9..32; variant ignored)
};

template <typename T>
static bool run_case_t(const Case& c, uint64_t seed, std::string& why) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HostBufs B;
  auto buf = [&](size_t n) { return B.get(n); };
  const EmuWeight w(B, rng, nd, c.N, c.K, c.bs, c.nested);
  T* x = reinterpret_cast<T*>(buf(2 * static_cast<size_t>(c.M) * c.K));
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.K; ++i) x[i] = T(nd(rng));
  T* bias = nullptr;
  if (c.bias) {
    bias = reinterpret_cast<T*>(buf(2 * c.N));
    for (int i = 0; i < c.N; ++i) bias[i] = T(nd(rng));
  }
  T* out = reinterpret_cast<T*>(buf(2 * static_cast<size_t>(c.M) * c.N));
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.N; ++i) out[i] = T(NAN);

  GemvPlan p = c.bx ? plan_gemm_bx(c.M, c.N, c.K, c.bs, c.nested, c.sms, 228 * 1024, 227 * 1024)
                    : plan_gemv(c.variant, c.M, c.N, c.K, c.bs, c.nested, c.sms, 228 * 1024, 227 * 1024);
  if (!p.ok) {
    why = "planner refused";
    return false;
  }
  if (c.warps_override && !c.bx) {
    // Same plan with fewer warps per block (the rw split must still divide).
    p.warps = c.warps_override;
    if (p.rw > p.warps) p.rw = p.warps;
    p.blocks = (p.units + p.rw - 1) / p.rw * p.splits;
  }
  if (c.deep && !c.bx) {
    p.rw = p.warps;
    p.splits = 1;
    p.blocks = (p.units + p.rw - 1) / p.rw;
  }
  float* partial = nullptr;
  if (p.splits > 1) partial = reinterpret_cast<float*>(buf(4 * static_cast<size_t>(p.splits) * c.M * c.N));

  GemvArgs a{};
  a.x = x;
  a.packed = w.packed;
  a.code = w.code;
  a.s = w.scale_args();
  const int shift = w.shift;
  a.block_shift = shift;
  a.nblocks = w.nblocks;
  a.bias = bias;
  a.out = out;
  a.partial = partial;
  a.M = c.M, a.N = c.N, a.K = c.K;
  a.units = p.units, a.rw = p.rw, a.splits = p.splits, a.stages = p.stages, a.stage_bytes = p.stage_bytes;

  int ring = p.warps * p.stages * p.stage_bytes, red = p.warps * p.rt * 512;
  const size_t smem_bytes =
      p.lut256 || p.bx ? static_cast<size_t>(p.smem) : static_cast<size_t>(kAlignPad + kRingOff + (ring > red ? ring : red));
  emu::S.allocs.clear();
  w.register_allocs();
  reg_alloc(x, 2 * static_cast<size_t>(c.M) * c.K, false);
  reg_alloc(bias, bias ? 2 * c.N : 0, false);
  reg_alloc(out, 2 * static_cast<size_t>(c.M) * c.N, true);
  reg_alloc(partial, partial ? 4 * static_cast<size_t>(p.splits) * c.M * c.N : 0, true);
  const EmuSmem sm(smem_bytes, seed, c.late);
  uint8_t* smem = sm.p;

  std::function<void()> body;
  const int gs = p.gs;
#define LOWBIT_EMU_BODY(RT_, GS_, NESTED_, REGS_)                                                  \
  body = p.lut256 ? std::function<void()>([&] { gemv_block<T, RT_, GS_, NESTED_, REGS_, RT_ == 1 && !REGS_>(a, smem); }) \
                  : std::function<void()>([&] { gemv_block<T, RT_, GS_, NESTED_, REGS_, false>(a, smem); })
  auto pick = [&](auto rt_c) {
    constexpr int RT_ = decltype(rt_c)::value;
    if (gs == 32) {
      if (c.nested) LOWBIT_EMU_BODY(RT_, 32, true, false); else LOWBIT_EMU_BODY(RT_, 32, false, false);
    } else if (gs == 64) {
      if (p.regs) {
        if (c.nested) LOWBIT_EMU_BODY(RT_, 64, true, true); else LOWBIT_EMU_BODY(RT_, 64, false, true);
      } else {
        if (c.nested) LOWBIT_EMU_BODY(RT_, 64, true, false); else LOWBIT_EMU_BODY(RT_, 64, false, false);
      }
    } else {
      if (p.regs) {
        if (c.nested) LOWBIT_EMU_BODY(RT_, 128, true, true); else LOWBIT_EMU_BODY(RT_, 128, false, true);
      } else {
        if (c.nested) LOWBIT_EMU_BODY(RT_, 128, true, false); else LOWBIT_EMU_BODY(RT_, 128, false, false);
      }
    }
  };
  auto pick_bx = [&](auto nt_c) {
    constexpr int NT_ = decltype(nt_c)::value;
    auto set = [&](auto gs_c, auto nested_c) {
      constexpr int GS_ = decltype(gs_c)::value;
      constexpr bool N_ = decltype(nested_c)::value;
      body = [&] { gemv_block<T, kBxRt, GS_, N_, false, false, NT_, true>(a, smem); };
    };
    using I32 = std::integral_constant<int, 32>;
    using I64 = std::integral_constant<int, 64>;
    using I128 = std::integral_constant<int, 128>;
    using BT = std::true_type;
    using BF = std::false_type;
    if (gs == 32) { if (c.nested) set(I32(), BT()); else set(I32(), BF()); }
    else if (gs == 64) { if (c.nested) set(I64(), BT()); else set(I64(), BF()); }
    else { if (c.nested) set(I128(), BT()); else set(I128(), BF()); }
  };
  if (p.bx) {
    if (p.nt == 2) pick_bx(std::integral_constant<int, 2>());
    else pick_bx(std::integral_constant<int, 4>());
  } else if (p.rt == 1) {
    pick(std::integral_constant<int, 1>());
  } else {
    pick(std::integral_constant<int, 2>());
  }
#undef LOWBIT_EMU_BODY
  for (int b = 0; b < p.blocks; ++b) emu::run_block(b, p.warps * 32, body);

  if (p.splits > 1) {  // splitk_reduce_kernel
    for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.N; ++i) {
      float v = 0.0f;
      for (int s = 0; s < p.splits; ++s) v += partial[s * static_cast<int64_t>(c.M) * c.N + i];
      if (bias) v += static_cast<float>(bias[i % c.N]);
      out[i] = T(v);
    }
  }

  // Reference: the kernel's math in double (codes rounded to T, the scale of
  // each quantization block times its partial sum).
  double worst = 0.0;
  bool ok = true;
  for (int m = 0; m < c.M && ok; ++m)
    for (int n = 0; n < c.N; ++n) {
      double ref = 0.0, mag = 0.0;
      for (int64_t b0 = 0; b0 < c.K;) {
        const int64_t e = static_cast<int64_t>(n) * c.K + b0;
        const int64_t blk = e >> shift;
        const int64_t blk_end = std::min<int64_t>((blk + 1) << shift, static_cast<int64_t>(n + 1) * c.K);
        const float sc = w.scale(blk);
        double part = 0.0;
        for (int64_t ee = e; ee < blk_end; ++ee) {
          const double cv = from_bits16<T>(bits16<T>(w.code[w.nibble(ee)]));
          const double xv = static_cast<float>(x[static_cast<int64_t>(m) * c.K + (ee - static_cast<int64_t>(n) * c.K)]);
          part += cv * xv;
          mag += std::fabs(cv * xv * sc);
        }
        ref += part * sc;
        b0 = blk_end - static_cast<int64_t>(n) * c.K;
      }
      if (bias) ref += static_cast<float>(bias[n]);
      const double got = static_cast<float>(out[static_cast<int64_t>(m) * c.N + n]);
      const double tol = std::fabs(ref) * (c.bf16 ? 1.0 / 128 : 1.0 / 1024) + 1e-5 * mag + 1e-6;
      const double err = std::fabs(got - ref);
      if (!(err <= tol)) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "m=%d n=%d got %.6g want %.6g (tol %.3g)", m, n, got, ref, tol);
        why = msg;
        ok = false;
        break;
      }
      worst = std::max(worst, err / tol);
    }
  return ok;
}

static bool run_case(const Case& c, uint64_t seed, std::string& why) {
  return c.bf16 ? run_case_t<c10::BFloat16>(c, seed, why) : run_case_t<c10::Half>(c, seed, why);
}

// ---------------------------------------------------------------- the transposed tensor-core kernel

struct TtCase {
  bool bf16;
  bool nested;
  int bs;
  int M, N, K;
  int sms;
  int cw;
  bool pairs;  // g read 4 values at a time (needs N % 4 == 0)
};

template <typename T>
static bool run_tt_t(const TtCase& c, uint64_t seed, std::string& why) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HostBufs B;
  auto buf = [&](size_t n) { return B.get(n); };
  const EmuWeight w(B, rng, nd, c.N, c.K, c.bs, c.nested);
  T* g = reinterpret_cast<T*>(buf(2 * static_cast<size_t>(c.M) * c.N));
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.N; ++i) g[i] = T(nd(rng));
  T* out = reinterpret_cast<T*>(buf(2 * static_cast<size_t>(c.M) * c.K));
  for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.K; ++i) out[i] = T(NAN);

  const GemmTPlan p = plan_gemm_t(c.M, c.N, c.K, c.bs, c.sms, c.cw);
  if (!p.ok) {
    why = "planner refused";
    return false;
  }
  float* partial = nullptr;
  if (p.splits > 1) {
    partial = reinterpret_cast<float*>(buf(4 * static_cast<size_t>(p.splits) * c.M * c.K));
    for (int64_t i = 0; i < static_cast<int64_t>(p.splits) * c.M * c.K; ++i) partial[i] = NAN;
  }
  GemmTArgs a{};
  a.g = g;
  a.packed = w.packed;
  a.code = w.code;
  a.s = w.scale_args();
  const int shift = w.shift;
  a.block_shift = shift;
  a.out = out;
  a.partial = partial;
  a.M = c.M, a.N = c.N, a.K = c.K;
  a.g_vec = c.pairs;
  a.cw = p.cw, a.col_blocks = p.col_blocks, a.m_chunks = p.m_chunks, a.splits = p.splits, a.steps = p.steps;
  a.pf = p.pf;

  emu::S.allocs.clear();
  w.register_allocs();
  reg_alloc(g, 2 * static_cast<size_t>(c.M) * c.N, false);
  reg_alloc(out, 2 * static_cast<size_t>(c.M) * c.K, true);
  reg_alloc(partial, partial ? 4 * static_cast<size_t>(p.splits) * c.M * c.K : 0, true);
  const EmuSmem sm(static_cast<size_t>(p.smem), seed, false);
  uint8_t* smem = sm.p;

  std::function<void()> body;
  auto set = [&](auto mt_c, auto nested_c) {
    constexpr int MT_ = decltype(mt_c)::value;
    constexpr bool N_ = decltype(nested_c)::value;
    body = [&] { gemm_t_block<T, MT_, N_>(a, smem); };
  };
  auto set_mt = [&](auto nested_c) {
    if (p.mt == 1) set(std::integral_constant<int, 1>(), nested_c);
    else if (p.mt == 2) set(std::integral_constant<int, 2>(), nested_c);
    else if (p.mt == 4) set(std::integral_constant<int, 4>(), nested_c);
    else set(std::integral_constant<int, 8>(), nested_c);
  };
  if (c.nested) set_mt(std::true_type()); else set_mt(std::false_type());
  for (int64_t b = 0; b < p.blocks; ++b) emu::run_block(static_cast<int>(b), kTtThreads, body);
  if (p.splits > 1) {  // splitk_reduce_kernel
    for (int64_t i = 0; i < static_cast<int64_t>(c.M) * c.K; ++i) {
      float v = 0.0f;
      for (int s = 0; s < p.splits; ++s) v += partial[s * static_cast<int64_t>(c.M) * c.K + i];
      out[i] = T(v);
    }
  }

  // Reference: the kernel's math in double (codes rounded to T, the scale
  // rounded to T, g * scale rounded to T).
  std::vector<float> sc(w.nblocks);
  for (int64_t b = 0; b < w.nblocks; ++b) sc[b] = w.scale(b);
  bool ok = true;
  std::vector<double> ref(c.K), mag(c.K);
  for (int m = 0; m < c.M && ok; ++m) {
    std::fill(ref.begin(), ref.end(), 0.0);
    std::fill(mag.begin(), mag.end(), 0.0);
    for (int n = 0; n < c.N; ++n) {
      const float gv = static_cast<float>(g[static_cast<int64_t>(m) * c.N + n]);
      for (int k = 0; k < c.K; ++k) {
        const int64_t e = static_cast<int64_t>(n) * c.K + k;
        const double cv = from_bits16<T>(bits16<T>(w.code[w.nibble(e)]));
        const double gs = from_bits16<T>(bits16<T>(gv * from_bits16<T>(bits16<T>(sc[e >> shift]))));
        ref[k] += cv * gs;
        mag[k] += std::fabs(cv * gs);
      }
    }
    for (int k = 0; k < c.K; ++k) {
      const double got = static_cast<float>(out[static_cast<int64_t>(m) * c.K + k]);
      const double tol = std::fabs(ref[k]) * (c.bf16 ? 1.0 / 128 : 1.0 / 1024) + 1e-5 * mag[k] + 1e-6;
      if (!(std::fabs(got - ref[k]) <= tol)) {
        char msg[256];
        std::snprintf(msg, sizeof msg, "m=%d k=%d got %.6g want %.6g (tol %.3g)", m, k, got, ref[k], tol);
        why = msg;
        ok = false;
        break;
      }
    }
  }
  return ok;
}

// The planner's launch shapes for the H200's 132 SMs, by hand: one wave of
// blocks, four warps along K only when they fill the slots clearly better,
// the L2 prefetch off on weights of 2^27 elements and more.
static int run_tt_plan_cases() {
  struct P {
    int M;
    int64_t N, K;
    int bps;
    int cw, splits, blocks, pf;
  };
  const P cases[] = {
      // 8192 x 28672, M <= 8 (3 blocks per SM, 396 slots): 224 columns of two
      // warps fill 224 slots; 112 columns of four, split 3 ways, fill 336.
      {4, 8192, 28672, 3, 4, 3, 336, 0},
      // M = 16 (264 slots): 224 or 2 x 112 blocks, a tie: two warps.
      {16, 8192, 28672, 2, 2, 1, 224, 0},
      // 4096 x 11008 (172 tiles): 86 x 4 = 344 of 396 slots, or 43 x 9 = 387.
      {8, 4096, 11008, 3, 4, 9, 387, 0},
      {32, 4096, 11008, 2, 2, 3, 258, 0},
      // M = 64 in one pass (MT = 8, one block per SM, 132 slots): 86 blocks
      // of two warps, or 43 columns of four split 3 ways = 129.
      {64, 4096, 11008, 1, 4, 3, 129, 0},
      // 28672 x 8192: 64 columns x 6 splits either way.
      {8, 28672, 8192, 3, 2, 6, 384, 0},
      // 4096 x 4096: at most 256 / (2 * 4) = 32 splits; 12 fill 384 slots.
      {2, 4096, 4096, 3, 2, 12, 384, 0},
  };
  int fails = 0;
  for (const P& c : cases) {
    const GemmTPlan p = plan_gemm_t(c.M, c.N, c.K, 64, 132, 0, c.bps);
    const bool ok = p.ok && p.cw == c.cw && p.splits == c.splits && p.blocks == c.blocks && p.pf == c.pf;
    std::printf("%s tt plan M=%-2d %lldx%lld bps=%d: cw=%d splits=%d blocks=%lld pf=%d (want %d %d %d %d)\n",
                ok ? "PASS" : "FAIL", c.M, static_cast<long long>(c.N), static_cast<long long>(c.K), c.bps, p.cw,
                p.splits, static_cast<long long>(p.blocks), p.pf, c.cw, c.splits, c.blocks, c.pf);
    fails += !ok;
  }
  // An explicit cw is kept.
  const GemmTPlan q = plan_gemm_t(4, 8192, 28672, 64, 132, 2, 3);
  if (!(q.ok && q.cw == 2 && q.blocks == 224)) {
    std::printf("FAIL tt plan: an explicit cw = 2 was not kept (cw=%d blocks=%lld)\n", q.cw,
                static_cast<long long>(q.blocks));
    ++fails;
  }
  // An explicit prefetch distance is kept (the default is none).
  const GemmTPlan r = plan_gemm_t(8, 28672, 8192, 64, 132, 0, 3, 2);
  if (!(r.ok && r.pf == 2)) {
    std::printf("FAIL tt plan: an explicit pf = 2 was not kept (pf=%d)\n", r.pf);
    ++fails;
  }
  // max_mt = 4: M = 64 as two m chunks of 32 rows (2 blocks per SM: 172 or
  // 86 x 3 = 258 blocks).
  const GemmTPlan u = plan_gemm_t(64, 4096, 11008, 64, 132, 0, 2, 0, 4);
  if (!(u.ok && u.mt == 4 && u.m_chunks == 2 && u.cw == 4 && u.blocks == 258)) {
    std::printf("FAIL tt plan: max_mt = 4 at M = 64 (mt=%d m_chunks=%d cw=%d blocks=%lld)\n", u.mt, u.m_chunks,
                u.cw, static_cast<long long>(u.blocks));
    ++fails;
  }
  const GemmTPlan v = plan_gemm_t(64, 4096, 11008, 64, 132, 0, 1);
  if (!(v.ok && v.mt == 8 && v.m_chunks == 1)) {
    std::printf("FAIL tt plan: M = 64 should be one m chunk of MT = 8 (mt=%d m_chunks=%d)\n", v.mt, v.m_chunks);
    ++fails;
  }
  return fails;
}

static int run_tt_cases(bool quick) {
  std::vector<TtCase> cases;
  std::mt19937 pick(777);
  auto any = [&](std::initializer_list<int> v) { return *(v.begin() + pick() % v.size()); };
  // Every template instance (dtype, MT by M, nested), every cw, blocksizes
  // from 64 up (a block straddling rows too), odd N (the 16-bit g path and a
  // partial last step), one or several N splits, several m chunks.
  for (int bs : {64, 128, 256, 1024})
    for (bool nested : {false, true})
      for (int M : {1, 5, 8, 9, 16, 17, 32, 40, 64}) {
        TtCase c{};
        c.bf16 = pick() % 2;
        c.nested = nested;
        c.bs = bs;
        c.M = M;
        c.N = any({1, 15, 16, 17, 33, 64, 100, 257});
        c.K = any({64, 128, 192, 512});
        if (bs == 1024) c.K = any({192, 320, 1088});  // blocks straddle rows
        c.sms = any({1, 2, 8, 64});
        c.cw = any({0, 1, 2, 4, 8});  // 0: the planner's choice
        c.pairs = c.N % 4 == 0 && pick() % 4 != 0;
        cases.push_back(c);
      }
  if (quick) {
    std::vector<TtCase> some;
    for (size_t i = 0; i < cases.size(); i += 4) some.push_back(cases[i]);
    cases.swap(some);
  }
  int fails = 0, n = 0;
  for (const TtCase& c : cases) {
    std::string why;
    const bool ok = c.bf16 ? run_tt_t<c10::BFloat16>(c, 5000 + n, why) : run_tt_t<c10::Half>(c, 5000 + n, why);
    std::printf("%s tt    %s bs=%-4d %s M=%-2d N=%-3d K=%-4d sms=%-2d cw=%d %s %s\n", ok ? "PASS" : "FAIL",
                c.bf16 ? "bf16" : "fp16", c.bs, c.nested ? "nested" : "plain ", c.M, c.N, c.K, c.sms, c.cw,
                c.pairs ? "vec  " : "16bit", why.c_str());
    std::fflush(stdout);
    fails += !ok;
    ++n;
  }
  const int plan_fails = run_tt_plan_cases();
  std::printf("%d transposed cases, %d failed; planner cases: %d failed\n", n, fails, plan_fails);
  fails += plan_fails;
  return fails;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (argc > 1 && std::string(argv[1]) == "--tt") return run_tt_cases(argc > 2 && std::string(argv[2]) == "--quick") ? 1 : 0;
  std::vector<Case> cases;
  if (argc == 14 && std::string(argv[1]) == "--case") {
    // --case async|regs|lut256|bx bf16 nested bs M N K sms bias late warps deep
    Case c{};
    const std::string vs = argv[2];
    c.variant = vs == "regs" ? Variant::kRegs : vs == "lut256" ? Variant::kLut256 : Variant::kAsync;
    c.bx = vs == "bx";
    c.bf16 = std::atoi(argv[3]);
    c.nested = std::atoi(argv[4]);
    c.bs = std::atoi(argv[5]);
    c.M = std::atoi(argv[6]);
    c.N = std::atoi(argv[7]);
    c.K = std::atoi(argv[8]);
    c.sms = std::atoi(argv[9]);
    c.bias = std::atoi(argv[10]);
    c.late = std::atoi(argv[11]);
    c.warps_override = std::atoi(argv[12]);
    c.deep = std::atoi(argv[13]);
    std::string why;
    const bool ok = run_case(c, std::getenv("SEED") ? std::atoll(std::getenv("SEED")) : 1, why);
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", why.c_str());
    return ok ? 0 : 1;
  }
  std::mt19937 pick(12345);
  auto any = [&](std::initializer_list<int> v) { return *(v.begin() + pick() % v.size()); };
  // Structured coverage: every template instance (dtype, RT by M, GS by
  // blocksize, nested, variant), both copy timings, odd N, K splits.
  for (Variant v : {Variant::kAsync, Variant::kRegs, Variant::kLut256})
    for (int bs : {32, 64, 128, 256, 1024})
      for (bool nested : {false, true})
        for (int M : {1, 3, 5, 8}) {
          Case c{};
          c.bf16 = pick() % 2;
          c.nested = nested;
          c.bs = bs;
          c.variant = v;
          c.M = M;
          c.N = any({1, 7, 16, 33, 40});
          c.K = any({256, 512, 768, 1024});
          if (bs == 1024 && c.K % 1024) c.K = 1024 + c.K;  // a block straddling rows
          c.sms = any({1, 2, 4, 16});
          c.bias = pick() % 2;
          c.late = pick() % 2;
          c.warps_override = any({0, 0, 4});
          c.deep = pick() % 2;
          if (c.deep) c.K = any({1024, 2048, 2816});
          cases.push_back(c);
        }
  // The small-M kernel: every blocksize class, both scale kinds, M across
  // both tile counts (partial tiles too), odd N, one or several K splits.
  for (int bs : {32, 64, 128, 256, 1024})
    for (bool nested : {false, true})
      for (int M : {9, 16, 23, 32}) {
        Case c{};
        c.bx = true;
        c.bf16 = pick() % 2;
        c.nested = nested;
        c.bs = bs;
        c.M = M;
        c.N = any({1, 7, 33, 200, 300});
        c.K = any({256, 512, 1024, 2816});
        if (bs == 1024 && c.K % 1024) c.K = 1024 + c.K;
        c.sms = any({1, 2, 4, 16});
        c.bias = pick() % 2;
        c.late = pick() % 2;
        cases.push_back(c);
      }
  // Blocks whose warps rw does not divide (6 warps, the planner's rw = 4 for
  // 16 units on 2 SMs): warps 4 and 5 have no share of K and must sit out.
  for (Variant v : {Variant::kAsync, Variant::kRegs})
    for (int M : {1, 5}) {
      Case c{};
      c.bf16 = true;
      c.nested = true;
      c.bs = 64;
      c.variant = v;
      c.M = M;
      c.N = 256 * (M > 4 ? 2 : 1);
      c.K = 512;
      c.sms = 2;
      c.warps_override = 6;
      cases.push_back(c);
    }
  if (quick) {  // every fourth case: both variants, every blocksize
    std::vector<Case> some;
    for (size_t i = 0; i < cases.size(); i += 4) some.push_back(cases[i]);
    cases.swap(some);
  }
  int fails = 0, n = 0;
  for (const Case& c : cases) {
    std::string why;
    const uint64_t seed = 1000 + n;
    const bool ok = run_case(c, seed, why);
    std::printf("%s %-5s %s bs=%-4d %s M=%d N=%-3d K=%-4d sms=%-2d bias=%d %s warps=%d%s %s\n", ok ? "PASS" : "FAIL",
                c.bx ? "bx" : c.variant == Variant::kAsync ? "async" : c.variant == Variant::kRegs ? "regs" : "lut256", c.bf16 ? "bf16" : "fp16", c.bs,
                c.nested ? "nested" : "plain ", c.M, c.N, c.K, c.sms, c.bias, c.late ? "late " : "early",
                c.warps_override, c.deep ? " deep" : "", why.c_str());
    std::fflush(stdout);
    fails += !ok;
    ++n;
  }
  std::printf("%d cases, %d failed, %ld fiber switches\n", n, fails, emu::S.switches);
  fails += run_tt_cases(quick);
  return fails ? 1 : 0;
}
