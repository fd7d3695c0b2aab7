#pragma once
// Argument checks and output allocation shared by the CPU and CUDA
// implementations of the quantize family, so both reject and shape alike.
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/weight_quant.h"

namespace lowbit {

struct Quantize4bitPlan {
  at::Tensor input;   // contiguous
  at::Tensor packed;  // uint8 [(n + 1) / 2, 1]
  at::Tensor absmax;  // float32 [nblocks]
  core::QuantType qt;
  int64_t n;
  int64_t nblocks;
};

inline Quantize4bitPlan plan_quantize_4bit(const at::Tensor& A, int64_t blocksize, const std::string& quant_type) {
  const char* op = "lowbit.quantize_4bit";
  check_defined(op, "A", A);
  check_float_dtype(op, "A", A.scalar_type());
  check_blocksize(op, "blocksize", blocksize);
  Quantize4bitPlan p;
  p.qt = parse_quant_type(op, quant_type);
  p.input = A.contiguous();
  p.n = A.numel();
  p.nblocks = ceil_div(p.n, blocksize);
  p.packed = at::empty({(p.n + 1) / 2, 1}, A.options().dtype(at::kByte));
  p.absmax = at::empty({p.nblocks}, A.options().dtype(at::kFloat));
  return p;
}

inline void check_dequantize_4bit(const char* op, at::IntArrayRef shape, at::ScalarType dtype) {
  check_float_dtype(op, "dtype", dtype);
  for (auto s : shape) LOWBIT_CHECK(s >= 0, op, ": argument 'shape' has a negative size: ", shape);
}

inline void check_code256(const char* op, const at::Tensor& code, const at::Tensor& ref) {
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 256);
  check_same_device(op, "code", code, ref, "A");
}

struct Quantize8bitPlan {
  at::Tensor input, code, out, absmax;
  int64_t n, nblocks;
};

inline Quantize8bitPlan plan_quantize_8bit(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  const char* op = "lowbit.quantize_8bit_blockwise";
  check_defined(op, "A", A);
  check_float_dtype(op, "A", A.scalar_type());
  check_code256(op, code, A);
  check_blocksize(op, "blocksize", blocksize);
  Quantize8bitPlan p;
  p.input = A.contiguous();
  p.code = code.contiguous();
  p.n = A.numel();
  p.nblocks = ceil_div(p.n, blocksize);
  p.out = at::empty(A.sizes(), A.options().dtype(at::kByte));
  p.absmax = at::empty({p.nblocks}, A.options().dtype(at::kFloat));
  return p;
}

inline void check_dequantize_8bit(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                  int64_t blocksize, at::ScalarType dtype) {
  const char* op = "lowbit.dequantize_8bit_blockwise";
  check_dtype(op, "A", A, at::kByte);
  check_dtype(op, "absmax", absmax, at::kFloat);
  check_same_device(op, "absmax", absmax, A, "A");
  check_code256(op, code, A);
  check_blocksize(op, "blocksize", blocksize);
  check_numel(op, "absmax", absmax, ceil_div(A.numel(), blocksize));
  check_float_dtype(op, "dtype", dtype);
}

}  // namespace lowbit
