// CPU implementations of the 4-bit matmul ops: dequantize the weight to
// float32 (the same element math as dequantize_4bit), one float32 matmul, one
// cast to the activation's dtype. Correct first; the matmul is ATen's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/blockwise.h"
#include "gemm/gemm_common.h"

namespace lowbit {
namespace {

at::Tensor dequantize_f32(const WeightQuant& w, int64_t N, int64_t K) {
  at::Tensor out = at::empty({N, K}, w.packed.options().dtype(at::kFloat));
  const core::ScaleSource scales = host_scales(w);
  const uint8_t* q = w.packed.const_data_ptr<uint8_t>();
  const float* cb = w.code.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * K, 32768, [&](int64_t i0, int64_t i1) {
    core::dequantize_4bit_range(q, cb, scales, w.blocksize, i0, i1, o);
  });
  return out;
}

at::Tensor gemm_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const at::Tensor& code, int64_t blocksize, int64_t N, int64_t K,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                         const std::optional<at::Tensor>& bias) {
  GemmPlan p = plan_gemm_4bit("lowbit.gemm_4bit", false, x, packed, absmax, code, blocksize, N, K, nested_absmax,
                              nested_code, offset, nested_blocksize, bias);
  if (p.M == 0 || N == 0) return at::empty(p.out_shape, x.options());
  at::Tensor out;
  if (K == 0) {
    out = at::zeros({p.M, N}, x.options().dtype(at::kFloat));
  } else {
    out = at::matmul(p.a.to(at::kFloat), dequantize_f32(p.w, N, K).t());
  }
  if (p.bias.defined()) out.add_(p.bias.to(at::kFloat));
  return out.to(x.scalar_type()).reshape(p.out_shape);
}

at::Tensor gemm_4bit_t_cpu(const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize, int64_t N, int64_t K,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                           int64_t nested_blocksize) {
  GemmPlan p = plan_gemm_4bit("lowbit.gemm_4bit_t", true, g, packed, absmax, code, blocksize, N, K, nested_absmax,
                              nested_code, offset, nested_blocksize, std::nullopt);
  if (p.M == 0 || K == 0) return at::empty(p.out_shape, g.options());
  if (N == 0) return at::zeros(p.out_shape, g.options());
  at::Tensor out = at::matmul(p.a.to(at::kFloat), dequantize_f32(p.w, N, K));
  return out.to(g.scalar_type()).reshape(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit_cpu);
  m.impl("gemm_4bit_t", &gemm_4bit_t_cpu);
}

}  // namespace lowbit
