#pragma once
// Argument checks and shapes shared by the CPU and CUDA implementations of the
// 4-bit matmul ops, so both reject and shape alike.
//   gemm_4bit:   out[..., N] = x[..., K] @ dequant(W)[N, K]^T (+ bias)
//   gemm_4bit_t: out[..., K] = g[..., N] @ dequant(W)[N, K]
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/weight_quant.h"

namespace lowbit {

struct GemmPlan {
  WeightQuant w;
  at::Tensor a;        // the activation as a contiguous [M, in_dim] matrix
  at::Tensor bias;     // undefined, or contiguous [N] in a's dtype
  std::vector<int64_t> out_shape;
  int64_t M = 0, N = 0, K = 0;
};

// `transposed` selects gemm_4bit_t: the activation's last dim is N and the
// output's is K.
inline GemmPlan plan_gemm_4bit(const char* op, bool transposed, const at::Tensor& a, const at::Tensor& packed,
                               const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize, int64_t N,
                               int64_t K, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize, const std::optional<at::Tensor>& bias) {
  const char* a_name = transposed ? "g" : "x";
  check_defined(op, a_name, a);
  check_float_dtype(op, a_name, a.scalar_type());
  LOWBIT_CHECK(a.dim() >= 1, op, ": argument '", a_name, "' must have at least one dimension, got a scalar");
  LOWBIT_CHECK(N >= 0 && K >= 0, op, ": the weight shape [N, K] must be non-negative, got [", N, ", ", K, "]");
  check_same_device(op, "packed", packed, a, a_name);
  GemmPlan p;
  p.w = check_weight_quant(op, packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                           nested_blocksize, N * K);
  const int64_t in_dim = transposed ? N : K;
  const int64_t out_dim = transposed ? K : N;
  LOWBIT_CHECK(a.size(-1) == in_dim, op, ": the last dimension of '", a_name, "' (shape ", a.sizes(), ") must be ",
               transposed ? "N" : "K", " = ", in_dim, " of the weight [N, K] = [", N, ", ", K, "]");
  p.M = in_dim > 0 ? a.numel() / in_dim : c10::multiply_integers(a.sizes().begin(), a.sizes().end() - 1);
  p.N = N;
  p.K = K;
  p.a = a.reshape({p.M, in_dim}).contiguous();
  p.out_shape.assign(a.sizes().begin(), a.sizes().end());
  p.out_shape.back() = out_dim;
  if (bias.has_value() && bias->defined()) {
    LOWBIT_CHECK(bias->scalar_type() == a.scalar_type(), op, ": argument 'bias' must have the dtype of '", a_name,
                 "' (", a.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(op, "bias", *bias, a, a_name);
    LOWBIT_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": argument 'bias' must have shape [", N,
                 "], got ", bias->sizes());
    p.bias = bias->contiguous();
  }
  return p;
}

}  // namespace lowbit
