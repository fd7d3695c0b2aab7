// CUDA implementations of the 4-bit matmul ops. The path is chosen on the host
// from M (rows of the activation, a host value: no synchronization):
//   gemm_4bit   M <= 8, fp16/bf16, K % 256 == 0, aligned: decode GEMV
//               (gemv_kernels.cuh; LOWBIT_GEMV_VARIANT picks the kernel)
//               M = 9..32, the same conditions: the small-M kernel (the GEMV's
//               body with x staged once per block, two weight tiles per warp,
//               2 or 4 x tiles per fragment; LOWBIT_GEMM_SMALLM=0 turns it off
//               so that benchmarks can compare it with the next path);
//               M = 33..64: the same kernel once per half of the rows
//               M <= kTcMaxM, fp16/bf16, K % 256 == 0: fused tensor-core kernel
//               otherwise: dequantize to x's dtype (caching allocator) + cuBLAS
//   gemm_4bit_t M = 1..64, fp16/bf16, K % 64 == 0, blocksize >= 64: the
//               transposed tensor-core kernel (gemm_t_kernels.cuh;
//               LOWBIT_GEMM_T_CW, LOWBIT_GEMM_T_PF and LOWBIT_GEMM_T_MAXMT
//               override its planner's warps along K, L2 prefetch distance
//               and largest m-tile count, for benchmarks)
//               M <= 4 otherwise, K % 16 == 0: the transposed GEMV
//               otherwise: dequantize + cuBLAS
//               (LOWBIT_GEMM_T_PATH=gemv|tc|dequant pins one path for
//               benchmarks: the two older paths only, the tensor-core kernel
//               for every M it takes, or always dequantize + cuBLAS)
// Everything runs on the current stream; buffers come from the caching
// allocator, so the ops are CUDA-graph capturable.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <cstdlib>
#include <cstring>

#include "gemm/gemm_common.h"
#include "gemm/gemm_kernels.cuh"
#include "gemm/gemm_t_kernels.cuh"
#include "gemm/gemv_kernels.cuh"
#include "quantize/scale_args.cuh"

namespace lowbit {
namespace {

// Above this many rows the dequantize + cuBLAS path wins (measured on H200:
// at M = 32 the two were even, at 64 the fused kernel was 2x slower).
constexpr int64_t kTcMaxM = 32;
constexpr int64_t kGemvTMaxM = 4;
// Up to this many rows of g the transposed tensor-core kernel takes the
// backward; above it, dequantize + cuBLAS. Measured on the H200 with the
// kernel of commit 73f89a7 (the scale folded with 16-bit multiplies, no L2
// prefetch, M = 33..64 in one pass of 8 m-tiles): at M = 64 the kernel took
// 21.8-223 us on the six Llama weights against 20.9-271 for dequantize +
// cuBLAS (it lost only on 4096 x 4096, by 0.9 us); at M = 96 dequantize +
// cuBLAS won on all six (4096 x 11008: 60 us against 113).
constexpr int64_t kTtMaxM = 64;

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The weight in `dtype`, [N, K], through the quantize family's dequantize kernel.
at::Tensor dequantize_weight(const WeightQuant& w, int64_t N, int64_t K, at::ScalarType dtype, cudaStream_t stream) {
  at::Tensor out = at::empty({N, K}, w.packed.options().dtype(dtype));
  launch_dequantize_4bit(w, N * K, out, stream);
  return out;
}

bool tc_eligible(const GemmPlan& p) {
  const auto dt = p.a.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) && p.M <= kTcMaxM && p.K % cuda::gemm::kKIter == 0 &&
         cuda::aligned16(p.a.const_data_ptr()) &&
         cuda::aligned16(p.w.packed.const_data_ptr());
}

template <typename T, int MT, bool NESTED>
void launch_tc_ch(const cuda::gemm::TcArgs& a, int ch, unsigned grid, cudaStream_t stream) {
  const int smem = cuda::gemm::tc_smem_bytes(MT);
  switch (ch) {
    case 4:
      cuda::gemm::gemm_4bit_tc_kernel<T, MT, 4, NESTED><<<grid, cuda::gemm::kTcThreads, smem, stream>>>(a);
      break;
    case 8:
      cuda::gemm::gemm_4bit_tc_kernel<T, MT, 8, NESTED><<<grid, cuda::gemm::kTcThreads, smem, stream>>>(a);
      break;
    default:
      cuda::gemm::gemm_4bit_tc_kernel<T, MT, 16, NESTED><<<grid, cuda::gemm::kTcThreads, smem, stream>>>(a);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MT>
void launch_tc_mt(const cuda::gemm::TcArgs& a, bool nested, int ch, unsigned grid, cudaStream_t stream) {
  if (nested)
    launch_tc_ch<T, MT, true>(a, ch, grid, stream);
  else
    launch_tc_ch<T, MT, false>(a, ch, grid, stream);
}

at::Tensor gemm_tc(const GemmPlan& p, cudaStream_t stream) {
  using namespace cuda::gemm;
  const int64_t M = p.M, N = p.N, K = p.K;
  // m-tiles of 8 rows; larger M loops over blocks of 32 rows (m_chunks).
  const int mt = M <= 8 ? 1 : M <= 16 ? 2 : 4;
  const int sms = sm_count();
  // Rows per block: enough that x (re-read by every block from L2) costs
  // less than the weight stream, and no fewer blocks than the chip holds.
  int rw = mt;
  while (rw < kTcWarps && ceil_div(N, 16 * rw * 2) >= 2 * sms) rw *= 2;
  const int row_tiles = static_cast<int>(ceil_div(N, 16 * rw));
  const int m_chunks = static_cast<int>(ceil_div(M, mt * 8));
  const int iters = static_cast<int>(K / kKIter);
  const int kwarps = kTcWarps / rw;
  int64_t blocks = static_cast<int64_t>(row_tiles) * m_chunks;
  int splits = 1;
  if (blocks * 2 < 3 * sms) {
    splits = static_cast<int>(std::min<int64_t>(ceil_div(2 * sms, blocks), std::max(1, iters / kwarps)));
  }
  blocks *= splits;

  at::Tensor out = at::empty({M, N}, p.a.options());
  at::Tensor partial;
  TcArgs a{};
  a.x = p.a.const_data_ptr();
  a.packed = p.w.packed.const_data_ptr<uint8_t>();
  a.code = p.w.code.const_data_ptr<float>();
  a.s = scale_args(p.w);
  a.block_shift = log2_int(p.w.blocksize);
  a.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  a.out = out.data_ptr();
  if (splits > 1) {
    partial = at::empty({splits, M, N}, p.a.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
  }
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.rw = rw;
  a.row_tiles = row_tiles;
  a.m_chunks = m_chunks;
  a.splits = splits;
  // Bytes per lane per chunk: a chunk must not cross a quantization block.
  const int ch = static_cast<int>(std::min<int64_t>(p.w.blocksize, 128) / 8);
  const bool nested = p.w.nested();
  const unsigned grid = static_cast<unsigned>(blocks);
  LOWBIT_CHECK(blocks < (int64_t{1} << 31), "lowbit.gemm_4bit: too many blocks");
  LOWBIT_DISPATCH_HALF_TYPES(p.a.scalar_type(), "gemm_4bit_tc", [&] {
                       switch (mt) {
                         case 1: launch_tc_mt<scalar_t, 1>(a, nested, ch, grid, stream); break;
                         case 2: launch_tc_mt<scalar_t, 2>(a, nested, ch, grid, stream); break;
                         default: launch_tc_mt<scalar_t, 4>(a, nested, ch, grid, stream); break;
                       }
                     });
  if (splits > 1) {
    const int64_t n = M * N;
    LOWBIT_DISPATCH_HALF_TYPES(p.a.scalar_type(), "gemm_4bit_reduce", [&] {
                         splitk_reduce_kernel<scalar_t><<<ceil_div(n, 256), 256, 0, stream>>>(
                             a.partial, splits, n, N, static_cast<const scalar_t*>(a.bias), out.data_ptr<scalar_t>());
                       });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ---------------------------------------------------------------- decode GEMV (M <= 8)

// LOWBIT_GEMV_VARIANT, read once per process: "async" (default), "regs",
// "lut256", or "tc" (no GEMV: the tensor-core kernel for M <= 8 too).
// Benchmarks run one process per variant.
cuda::gemv::Variant gemv_variant() {
  using cuda::gemv::Variant;
  static const Variant v = [] {
    const char* e = std::getenv("LOWBIT_GEMV_VARIANT");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "async") == 0) return Variant::kAsync;
    if (std::strcmp(e, "regs") == 0) return Variant::kRegs;
    if (std::strcmp(e, "lut256") == 0) return Variant::kLut256;
    if (std::strcmp(e, "tc") == 0) return Variant::kTc;
    TORCH_WARN("lowbit: LOWBIT_GEMV_VARIANT='", e, "' is not one of async, regs, lut256, tc; using async");
    return Variant::kAsync;
  }();
  return v;
}

bool gemv_eligible(const GemmPlan& p, int64_t max_m = cuda::gemv::kMaxM) {
  const auto dt = p.a.scalar_type();
  if (!(dt == at::kHalf || dt == at::kBFloat16) || p.M > max_m || p.N > INT32_MAX ||
      p.K % cuda::gemv::kStageK != 0 || p.K > INT32_MAX)
    return false;
  if (!cuda::aligned16(p.a.const_data_ptr()) || !cuda::aligned16(p.w.packed.const_data_ptr())) return false;
  // The scale copies are 16-byte (plain float scales) or 8-byte (nested
  // codes) cp.async, which need aligned sources.
  if (p.w.nested()) return (reinterpret_cast<uintptr_t>(p.w.absmax.const_data_ptr()) & 7u) == 0;
  return cuda::aligned16(p.w.absmax.const_data_ptr());
}

// Dynamic shared memory above 48 KB must be allowed per kernel and device;
// allowing the device's maximum once covers every launch of that kernel.
// `done` belongs to one kernel (the caller's instantiation holds it): every
// kernel here has the same type, so a static in this function would be one
// flag for all of them.
template <typename Kernel>
void allow_smem(Kernel kernel, const cudaDeviceProp& prop, std::atomic<uint64_t>& done) {
  const int dev = at::cuda::current_device();
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if (done.load(std::memory_order_relaxed) & bit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(prop.sharedMemPerBlockOptin)));
  done.fetch_or(bit, std::memory_order_relaxed);
}

template <typename T, int RT, int GS, bool NESTED, bool REGS, bool L256 = false>
void launch_gemv_k(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};  // one bit per device, for this instantiation
  auto kernel = cuda::gemv::gemv_4bit_kernel<T, RT, GS, NESTED, REGS, L256>;
  allow_smem(kernel, *at::cuda::getCurrentDeviceProperties(), done);
  kernel<<<static_cast<unsigned>(g.blocks), g.warps * 32, g.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int GS, bool NESTED, int NT>
void launch_gemm_bx_k(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  auto kernel = cuda::gemv::gemm_4bit_bx_kernel<T, GS, NESTED, NT>;
  allow_smem(kernel, *at::cuda::getCurrentDeviceProperties(), done);
  kernel<<<static_cast<unsigned>(g.blocks), g.warps * 32, g.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool NESTED, int NT>
void launch_gemm_bx_gs(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, cudaStream_t stream) {
  switch (g.gs) {
    case 32: launch_gemm_bx_k<T, 32, NESTED, NT>(a, g, stream); break;
    case 64: launch_gemm_bx_k<T, 64, NESTED, NT>(a, g, stream); break;
    default: launch_gemm_bx_k<T, 128, NESTED, NT>(a, g, stream); break;
  }
}

template <typename T, int NT>
void launch_gemm_bx_n(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, bool nested, cudaStream_t stream) {
  if (nested) launch_gemm_bx_gs<T, true, NT>(a, g, stream);
  else launch_gemm_bx_gs<T, false, NT>(a, g, stream);
}

template <typename T, int RT, bool NESTED>
void launch_gemv_gs(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, cudaStream_t stream) {
  if constexpr (RT == 1) {
    if (g.lut256) {
      switch (g.gs) {
        case 32: launch_gemv_k<T, 1, 32, NESTED, false, true>(a, g, stream); break;
        case 64: launch_gemv_k<T, 1, 64, NESTED, false, true>(a, g, stream); break;
        default: launch_gemv_k<T, 1, 128, NESTED, false, true>(a, g, stream); break;
      }
      return;
    }
  }
  switch (g.gs) {
    case 32: launch_gemv_k<T, RT, 32, NESTED, false>(a, g, stream); break;
    case 64:
      if (g.regs) launch_gemv_k<T, RT, 64, NESTED, true>(a, g, stream);
      else launch_gemv_k<T, RT, 64, NESTED, false>(a, g, stream);
      break;
    default:
      if (g.regs) launch_gemv_k<T, RT, 128, NESTED, true>(a, g, stream);
      else launch_gemv_k<T, RT, 128, NESTED, false>(a, g, stream);
      break;
  }
}

template <typename T>
void launch_gemv(const cuda::gemv::GemvArgs& a, const cuda::gemv::GemvPlan& g, bool nested, cudaStream_t stream) {
  if (g.bx) {
    if (g.nt == 2) launch_gemm_bx_n<T, 2>(a, g, nested, stream);
    else launch_gemm_bx_n<T, 4>(a, g, nested, stream);
    return;
  }
  if (g.rt == 1) {
    if (nested) launch_gemv_gs<T, 1, true>(a, g, stream);
    else launch_gemv_gs<T, 1, false>(a, g, stream);
  } else {
    if (nested) launch_gemv_gs<T, 2, true>(a, g, stream);
    else launch_gemv_gs<T, 2, false>(a, g, stream);
  }
}

// Rows [m0, m0 + M) of x into the same rows of out (a contiguous [p.M, N]
// tensor; allocated here when undefined); g was planned for M rows.
at::Tensor gemv(const GemmPlan& p, const cuda::gemv::GemvPlan& g, cudaStream_t stream, at::Tensor out = {},
                int64_t m0 = 0, int64_t M = -1) {
  const int64_t N = p.N;
  if (M < 0) M = p.M;
  if (!out.defined()) out = at::empty({p.M, N}, p.a.options());
  at::Tensor partial;
  cuda::gemv::GemvArgs a{};
  a.x = static_cast<const char*>(p.a.const_data_ptr()) + m0 * p.K * p.a.element_size();
  a.packed = p.w.packed.const_data_ptr<uint8_t>();
  a.code = p.w.code.const_data_ptr<float>();
  a.s = scale_args(p.w);
  a.block_shift = log2_int(p.w.blocksize);
  a.nblocks = p.w.nblocks;
  a.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  a.out = static_cast<char*>(out.data_ptr()) + m0 * N * out.element_size();
  if (g.splits > 1) {
    partial = at::empty({g.splits, M, N}, p.a.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
  }
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(p.K);
  a.units = g.units;
  a.rw = g.rw;
  a.splits = g.splits;
  a.stages = g.stages;
  a.stage_bytes = g.stage_bytes;
  const bool nested = p.w.nested();
  LOWBIT_DISPATCH_HALF_TYPES(p.a.scalar_type(), "gemm_4bit_gemv", [&] {
    launch_gemv<scalar_t>(a, g, nested, stream);
    if (g.splits > 1) {
      const int64_t n = M * N;
      cuda::gemm::splitk_reduce_kernel<scalar_t><<<ceil_div(n, 256), 256, 0, stream>>>(
          a.partial, g.splits, n, N, static_cast<const scalar_t*>(a.bias), static_cast<scalar_t*>(a.out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor gemm_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize, int64_t N, int64_t K,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                          int64_t nested_blocksize, const std::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of({&x, &packed, &absmax, &code}));
  GemmPlan p = plan_gemm_4bit("lowbit.gemm_4bit", false, x, packed, absmax, code, blocksize, N, K, nested_absmax,
                              nested_code, offset, nested_blocksize, bias);
  if (p.M == 0 || N == 0) return at::empty(p.out_shape, x.options());
  if (K == 0) {
    at::Tensor out = at::zeros({p.M, N}, x.options());
    if (p.bias.defined()) out.add_(p.bias);
    return out.reshape(p.out_shape);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (gemv_eligible(p)) {
    const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
    const cuda::gemv::GemvPlan g = cuda::gemv::plan_gemv(
        gemv_variant(), static_cast<int>(p.M), N, K, p.w.blocksize, p.w.nested(), prop.multiProcessorCount,
        static_cast<int>(prop.sharedMemPerMultiprocessor), static_cast<int>(prop.sharedMemPerBlockOptin));
    if (g.ok) return gemv(p, g, stream).reshape(p.out_shape);
  }
  // M = 9..32: the small-M kernel (x staged once per block, several x tiles
  // per decoded fragment). M = 33..64: the same kernel on each half of the
  // rows, which streams the weight twice and still costs less than
  // dequantizing it (on the H100 at M = 64: 4096x11008 64 us against 82 us
  // for dequantize + cuBLAS, 28672x8192 220 us against 397 us).
  static const bool smallm_on = [] {
    const char* e = std::getenv("LOWBIT_GEMM_SMALLM");
    return !(e && e[0] == '0');
  }();
  if (smallm_on && p.M > cuda::gemv::kMaxM && gemv_eligible(p, 2 * cuda::gemv::kBxMaxM)) {
    const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
    const int64_t m_first = p.M > cuda::gemv::kBxMaxM ? p.M / 2 : p.M;
    auto plan = [&](int64_t rows) {
      return cuda::gemv::plan_gemm_bx(static_cast<int>(rows), N, K, p.w.blocksize, p.w.nested(),
                                      prop.multiProcessorCount, static_cast<int>(prop.sharedMemPerMultiprocessor),
                                      static_cast<int>(prop.sharedMemPerBlockOptin));
    };
    const cuda::gemv::GemvPlan g1 = plan(m_first);
    const cuda::gemv::GemvPlan g2 = m_first < p.M ? plan(p.M - m_first) : g1;
    if (g1.ok && g2.ok) {
      at::Tensor out = gemv(p, g1, stream, {}, 0, m_first);
      if (m_first < p.M) gemv(p, g2, stream, out, m_first, p.M - m_first);
      return out.reshape(p.out_shape);
    }
  }
  if (tc_eligible(p)) return gemm_tc(p, stream).reshape(p.out_shape);
  // Large M (or shapes the fused kernel does not take): the weight in x's
  // dtype from the caching allocator, then one cuBLAS call.
  at::Tensor wd = dequantize_weight(p.w, N, K, x.scalar_type(), stream);
  at::Tensor out = p.bias.defined() ? at::addmm(p.bias, p.a, wd.t()) : at::mm(p.a, wd.t());
  return out.reshape(p.out_shape);
}

at::Tensor gemv_t(const GemmPlan& p, cudaStream_t stream) {
  using namespace cuda::gemm;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int slices = static_cast<int>(ceil_div(K, kGemvTSlice));
  const int sms = sm_count();
  // Enough blocks for about four per multiprocessor, at least 32 rows each.
  const int64_t max_splits = std::max<int64_t>(1, N / 32);
  const int splits = static_cast<int>(std::min<int64_t>(max_splits, std::max<int64_t>(1, ceil_div(4 * sms, slices))));
  at::Tensor partial = at::empty({splits, M, K}, p.a.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, K}, p.a.options());
  GemvTArgs a{};
  a.g = p.a.const_data_ptr();
  a.packed = p.w.packed.const_data_ptr<uint8_t>();
  a.code = p.w.code.const_data_ptr<float>();
  a.s = scale_args(p.w);
  a.block_shift = log2_int(p.w.blocksize);
  a.partial = partial.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.slices = slices;
  a.splits = splits;
  const unsigned grid = static_cast<unsigned>(slices) * splits;
  const bool nested = p.w.nested();
  // The kernel's accumulators and FMAs per element scale with its MAXM: one,
  // two or four rows of g (LOWBIT_GEMV_T_MAXM=4, read once per process,
  // forces four for every M, as before, for comparisons).
  static const bool fixed4 = [] {
    const char* e = std::getenv("LOWBIT_GEMV_T_MAXM");
    return e != nullptr && std::strcmp(e, "4") == 0;
  }();
  const int maxm = fixed4 || M > 2 ? 4 : static_cast<int>(M);
  LOWBIT_DISPATCH_HALF_TYPES(p.a.scalar_type(), "gemm_4bit_t_gemv", [&] {
                       auto launch = [&](auto maxm_c) {
                         constexpr int MM = decltype(maxm_c)::value;
                         if (nested)
                           gemv_t_kernel<scalar_t, MM, true><<<grid, kGemvTThreads, 0, stream>>>(a);
                         else
                           gemv_t_kernel<scalar_t, MM, false><<<grid, kGemvTThreads, 0, stream>>>(a);
                       };
                       if (maxm == 1) launch(std::integral_constant<int, 1>());
                       else if (maxm == 2) launch(std::integral_constant<int, 2>());
                       else launch(std::integral_constant<int, 4>());
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                       const int64_t n = M * K;
                       splitk_reduce_kernel<scalar_t><<<ceil_div(n, 256), 256, 0, stream>>>(
                           a.partial, splits, n, K, nullptr, out.data_ptr<scalar_t>());
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     });
  return out;
}

enum class TPath { kAuto, kGemv, kTc, kDequant };

// LOWBIT_GEMM_T_PATH, read once per process (benchmarks compare the paths
// in separate processes); LOWBIT_GEMM_T_CW: the tensor-core kernel's warps
// side by side along K (1, 2, 4, 8).
TPath t_path() {
  static const TPath v = [] {
    const char* e = std::getenv("LOWBIT_GEMM_T_PATH");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return TPath::kAuto;
    if (std::strcmp(e, "gemv") == 0) return TPath::kGemv;
    if (std::strcmp(e, "tc") == 0) return TPath::kTc;
    if (std::strcmp(e, "dequant") == 0) return TPath::kDequant;
    TORCH_WARN("lowbit: LOWBIT_GEMM_T_PATH='", e, "' is not one of auto, gemv, tc, dequant; using auto");
    return TPath::kAuto;
  }();
  return v;
}

// An integer from the environment (unset or empty: `unset`).
int env_int(const char* name, int unset) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : unset;
}
// Benchmark knobs, each read once per process. LOWBIT_GEMM_T_PF: an L2
// prefetch distance in a warp's steps (unset or 0: none). LOWBIT_GEMM_T_CW:
// warps along K (unset or 0: the planner's choice). LOWBIT_GEMM_T_MAXMT: the
// largest m-tile count, 4 or 8 (unset: 8; 4 runs M = 33..64 as two passes).
int t_pf() {
  static const int v = env_int("LOWBIT_GEMM_T_PF", 0);
  return v;
}
int t_cw() {
  static const int v = env_int("LOWBIT_GEMM_T_CW", 0);
  return v;
}
int t_max_mt() {
  static const int v = env_int("LOWBIT_GEMM_T_MAXMT", 8) == 4 ? 4 : 8;
  return v;
}

// Blocks of this instantiation that fit one SM (registers, shared memory),
// asked once per device; the planner sizes the grid to one wave of them.
template <typename T, int MT, bool NESTED>
int tt_blocks_per_sm(int smem) {
  static std::atomic<int> cache[64] = {};
  const int dev = at::cuda::current_device();
  std::atomic<int>& slot = cache[dev & 63];
  int v = slot.load(std::memory_order_relaxed);
  if (v > 0) return v;
  static std::atomic<uint64_t> done{0};
  auto kernel = cuda::gemv::gemm_4bit_t_tc_kernel<T, MT, NESTED>;
  allow_smem(kernel, *at::cuda::getCurrentDeviceProperties(), done);
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, cuda::gemv::kTtThreads, smem));
  v = std::max(v, 1);
  slot.store(v, std::memory_order_relaxed);
  return v;
}

template <typename T, int MT, bool NESTED>
void launch_tt_k(const cuda::gemv::GemmTArgs& a, const cuda::gemv::GemmTPlan& t, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  auto kernel = cuda::gemv::gemm_4bit_t_tc_kernel<T, MT, NESTED>;
  allow_smem(kernel, *at::cuda::getCurrentDeviceProperties(), done);
  kernel<<<static_cast<unsigned>(t.blocks), cuda::gemv::kTtThreads, t.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool tt_eligible(const GemmPlan& p) {
  const auto dt = p.a.scalar_type();
  return (dt == at::kHalf || dt == at::kBFloat16) && p.K % cuda::gemv::kTtK == 0 &&
         p.w.blocksize >= cuda::gemv::kTtK && p.M <= INT32_MAX &&
         (reinterpret_cast<uintptr_t>(p.w.packed.const_data_ptr()) & 3u) == 0;
}

// The transposed tensor-core kernel; an undefined tensor when the planner
// refuses the shape.
at::Tensor gemm_t_tc(const GemmPlan& p, cudaStream_t stream) {
  using namespace cuda::gemv;
  const int64_t M = p.M, N = p.N, K = p.K;
  const bool nested = p.w.nested();
  const int mt = tt_mt(static_cast<int>(M), t_max_mt());
  at::Tensor out;
  LOWBIT_DISPATCH_HALF_TYPES(p.a.scalar_type(), "gemm_4bit_t_tc", [&] {
    auto run = [&](auto mt_c, auto nested_c) {
      constexpr int MT = decltype(mt_c)::value;
      constexpr bool NS = decltype(nested_c)::value;
      const int bps = tt_blocks_per_sm<scalar_t, MT, NS>(tt_smem_bytes(MT));
      const GemmTPlan t = plan_gemm_t(static_cast<int>(M), N, K, p.w.blocksize, sm_count(), t_cw(), bps, t_pf(),
                                          t_max_mt());
      if (!t.ok) return;
      out = at::empty({M, K}, p.a.options());
      at::Tensor partial;
      GemmTArgs a{};
      a.g = p.a.const_data_ptr();
      a.packed = p.w.packed.const_data_ptr<uint8_t>();
      a.code = p.w.code.const_data_ptr<float>();
      a.s = scale_args(p.w);
      a.block_shift = log2_int(p.w.blocksize);
      a.out = out.data_ptr();
      if (t.splits > 1) {
        partial = at::empty({t.splits, M, K}, p.a.options().dtype(at::kFloat));
        a.partial = partial.data_ptr<float>();
      }
      a.M = static_cast<int>(M);
      a.N = static_cast<int>(N);
      a.K = static_cast<int>(K);
      a.g_vec = N % 4 == 0 && (reinterpret_cast<uintptr_t>(a.g) & 7u) == 0;
      a.cw = t.cw;
      a.col_blocks = t.col_blocks;
      a.m_chunks = t.m_chunks;
      a.splits = t.splits;
      a.steps = t.steps;
      a.pf = t.pf;
      launch_tt_k<scalar_t, MT, NS>(a, t, stream);
      if (t.splits > 1) {
        const int64_t n = M * K;
        cuda::gemm::splitk_reduce_kernel<scalar_t><<<ceil_div(n, 256), 256, 0, stream>>>(
            a.partial, t.splits, n, K, nullptr, out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    auto with_mt = [&](auto nested_c) {
      if (mt == 1) run(std::integral_constant<int, 1>(), nested_c);
      else if (mt == 2) run(std::integral_constant<int, 2>(), nested_c);
      else if (mt == 4) run(std::integral_constant<int, 4>(), nested_c);
      else run(std::integral_constant<int, 8>(), nested_c);
    };
    if (nested) with_mt(std::true_type());
    else with_mt(std::false_type());
  });
  return out;
}

at::Tensor gemm_4bit_t_cuda(const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, int64_t blocksize, int64_t N, int64_t K,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                            int64_t nested_blocksize) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of({&g, &packed, &absmax, &code}));
  GemmPlan p = plan_gemm_4bit("lowbit.gemm_4bit_t", true, g, packed, absmax, code, blocksize, N, K, nested_absmax,
                              nested_code, offset, nested_blocksize, std::nullopt);
  if (p.M == 0 || K == 0) return at::empty(p.out_shape, g.options());
  if (N == 0) return at::zeros(p.out_shape, g.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dt = p.a.scalar_type();
  const TPath path = t_path();
  const bool gemv_ok = (dt == at::kHalf || dt == at::kBFloat16) && p.M <= kGemvTMaxM && K % 16 == 0 &&
                       (reinterpret_cast<uintptr_t>(p.w.packed.const_data_ptr()) & 7u) == 0;
  const bool tt_ok = tt_eligible(p) && (path == TPath::kTc || (path == TPath::kAuto && p.M <= kTtMaxM));
  // The tensor-core kernel wherever it applies, from one row: at M = 1 on the
  // H200 it took 10.8-86.2 us on the six Llama weights (commit 35d0828)
  // against 12.7-114.7 for the GEMV (commit 9f7b5cf's run); at M = 2 and 4
  // the GEMV took 1.6-2.9x the kernel's time. The GEMV takes the rows the
  // kernel cannot (K % 64 != 0, blocksize < 64).
  if (tt_ok) {
    at::Tensor out = gemm_t_tc(p, stream);  // undefined if its planner refuses the shape
    if (out.defined()) return out.reshape(p.out_shape);
  }
  if (gemv_ok && path != TPath::kTc && path != TPath::kDequant) return gemv_t(p, stream).reshape(p.out_shape);
  at::Tensor wd = dequantize_weight(p.w, N, K, dt, stream);
  return at::mm(p.a, wd).reshape(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemm_4bit_t", &gemm_4bit_t_cuda);
}

}  // namespace lowbit
