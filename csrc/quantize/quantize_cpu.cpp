// CPU implementations of the quantize family: the reference the CUDA kernels
// must match byte for byte, parallel over blocks.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/blockwise.h"
#include "quantize/quantize_common.h"

namespace lowbit {
namespace {

// Blocks per parallel task: enough work to amortise the task overhead.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type) {
  auto p = plan_quantize_4bit(A, blocksize, std::string(quant_type));
  uint8_t* packed = p.packed.data_ptr<uint8_t>();
  float* absmax = p.absmax.data_ptr<float>();
  LOWBIT_DISPATCH_FLOAT_TYPES(p.input.scalar_type(), "quantize_4bit_cpu", [&] {
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    at::parallel_for(0, p.nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      core::quantize_4bit_blocks(p.qt, x, p.n, blocksize, b0, b1, packed, absmax);
    });
  });
  return {p.packed, p.absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  const char* op = "lowbit.dequantize_4bit";
  check_dequantize_4bit(op, shape, dtype);
  const int64_t n = c10::multiply_integers(shape);
  WeightQuant w = check_weight_quant(op, packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                                     nested_blocksize, n);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const core::ScaleSource scales = host_scales(w);
  const uint8_t* q = w.packed.const_data_ptr<uint8_t>();
  const float* cb = w.code.const_data_ptr<float>();
  LOWBIT_DISPATCH_FLOAT_TYPES(dtype, "dequantize_4bit_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      core::dequantize_4bit_range(q, cb, scales, blocksize, i0, i1, o);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                               int64_t blocksize) {
  auto p = plan_quantize_8bit(A, code, blocksize);
  uint8_t* out = p.out.data_ptr<uint8_t>();
  float* absmax = p.absmax.data_ptr<float>();
  const float* cb = p.code.const_data_ptr<float>();
  LOWBIT_DISPATCH_FLOAT_TYPES(p.input.scalar_type(), "quantize_8bit_cpu", [&] {
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    at::parallel_for(0, p.nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      core::quantize_8bit_blocks(cb, x, p.n, blocksize, b0, b1, out, absmax);
    });
  });
  return {p.out, p.absmax};
}

at::Tensor dequantize_8bit_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                         int64_t blocksize, at::ScalarType dtype) {
  check_dequantize_8bit(A, absmax, code, blocksize, dtype);
  at::Tensor q = A.contiguous(), am = absmax.contiguous(), cb = code.contiguous();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  LOWBIT_DISPATCH_FLOAT_TYPES(dtype, "dequantize_8bit_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, q.numel(), 32768, [&](int64_t i0, int64_t i1) {
      core::dequantize_8bit_range(q.const_data_ptr<uint8_t>(), am.const_data_ptr<float>(),
                                  cb.const_data_ptr<float>(), blocksize, i0, i1, o);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("quantize_8bit_blockwise", &quantize_8bit_blockwise_cpu);
  m.impl("dequantize_8bit_blockwise", &dequantize_8bit_blockwise_cpu);
}

}  // namespace lowbit
