// CUDA implementations of the quantize family: launch on the current stream
// of the input's device, no host synchronization, no host->device copies.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "quantize/quantize_common.h"
#include "quantize/quantize_kernels.cuh"
#include "quantize/scale_args.cuh"

namespace lowbit {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t threads) { return static_cast<unsigned>(ceil_div(threads, kThreads)); }

template <typename T, core::QuantType QT>
void launch_quantize_4bit(const T* x, int64_t n, int64_t blocksize, int64_t nblocks, uint8_t* packed, float* absmax,
                          cudaStream_t stream) {
  const bool vec = cuda::aligned16(x);
  const unsigned small_grid = grid_for(ceil_div(ceil_div(n, 8), cuda::kQuantChunks));
  const unsigned large_grid = grid_for(nblocks * 32);
  switch (blocksize) {
#define LOWBIT_SMALL(BS)                                                                              \
  case BS:                                                                                            \
    cuda::quantize_4bit_small_kernel<T, QT, BS><<<small_grid, kThreads, 0, stream>>>(x, n, vec, packed, absmax); \
    break;
#define LOWBIT_LARGE(BS)                                                                                  \
  case BS:                                                                                                \
    cuda::quantize_4bit_large_kernel<T, QT, BS><<<large_grid, kThreads, 0, stream>>>(x, n, vec, nblocks, packed, \
                                                                                      absmax);            \
    break;
    LOWBIT_SMALL(32)
    LOWBIT_SMALL(64)
    LOWBIT_SMALL(128)
    LOWBIT_SMALL(256)
    LOWBIT_LARGE(512)
    LOWBIT_LARGE(1024)
    LOWBIT_LARGE(2048)
    LOWBIT_LARGE(4096)
#undef LOWBIT_SMALL
#undef LOWBIT_LARGE
    default:
      TORCH_CHECK(false, lowbit::message("lowbit.quantize_4bit: unsupported blocksize ", blocksize));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type) {
  const c10::cuda::OptionalCUDAGuard guard(A.device());
  auto p = plan_quantize_4bit(A, blocksize, std::string(quant_type));
  if (p.n == 0) return {p.packed, p.absmax};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LOWBIT_DISPATCH_FLOAT_TYPES(p.input.scalar_type(), "quantize_4bit_cuda", [&] {
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    uint8_t* packed = p.packed.data_ptr<uint8_t>();
    float* absmax = p.absmax.data_ptr<float>();
    if (p.qt == core::QuantType::NF4)
      launch_quantize_4bit<scalar_t, core::QuantType::NF4>(x, p.n, blocksize, p.nblocks, packed, absmax, stream);
    else
      launch_quantize_4bit<scalar_t, core::QuantType::FP4>(x, p.n, blocksize, p.nblocks, packed, absmax, stream);
  });
  return {p.packed, p.absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize) {
  const char* op = "lowbit.dequantize_4bit";
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of({&packed, &absmax, &code}));
  check_dequantize_4bit(op, shape, dtype);
  const int64_t n = c10::multiply_integers(shape);
  WeightQuant w = check_weight_quant(op, packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                                     nested_blocksize, n);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  launch_dequantize_4bit(w, n, out, at::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                                int64_t blocksize) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of({&A, &code}));
  auto p = plan_quantize_8bit(A, code, blocksize);
  if (p.n == 0) return {p.out, p.absmax};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LOWBIT_DISPATCH_FLOAT_TYPES(p.input.scalar_type(), "quantize_8bit_cuda", [&] {
    cuda::quantize_8bit_kernel<scalar_t><<<grid_for(p.nblocks * 32), kThreads, 0, stream>>>(
        p.input.const_data_ptr<scalar_t>(), p.n, blocksize, p.nblocks, p.code.const_data_ptr<float>(),
        p.out.data_ptr<uint8_t>(), p.absmax.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p.out, p.absmax};
}

at::Tensor dequantize_8bit_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                          int64_t blocksize, at::ScalarType dtype) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of({&A, &absmax, &code}));
  check_dequantize_8bit(A, absmax, code, blocksize, dtype);
  at::Tensor q = A.contiguous(), am = absmax.contiguous(), cb = code.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  const int64_t n = q.numel();
  if (n == 0) return out;
  const unsigned grid = std::min<int64_t>(grid_for(n), 65535);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LOWBIT_DISPATCH_FLOAT_TYPES(dtype, "dequantize_8bit_cuda", [&] {
    cuda::dequantize_8bit_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.const_data_ptr<uint8_t>(), n, log2_int(blocksize), am.const_data_ptr<float>(), cb.const_data_ptr<float>(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("quantize_8bit_blockwise", &quantize_8bit_blockwise_cuda);
  m.impl("dequantize_8bit_blockwise", &dequantize_8bit_blockwise_cuda);
}

}  // namespace lowbit
