// Every schema of the lowbit op library, in one place. Implementations live
// beside their kernels (quantize/, gemm/, optim/), registered per device with
// TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "core/dynamic_map.h"

namespace {

// The 8-bit dynamic maps as tensors (CPU, float32). No tensor argument, so it
// is registered for every backend at once.
at::Tensor dynamic_map(bool is_signed) {
  const float* src = is_signed ? lowbit::core::kDynamicMapSigned : lowbit::core::kDynamicMapUnsigned;
  at::Tensor out = at::empty({256}, at::kFloat);
  std::copy(src, src + 256, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(lowbit, m) {
  // ---- quantize/ : 4-bit weights and blockwise 8-bit tensors ----
  // Flattened input, blocks of `blocksize` elements; returns packed codes
  // uint8 [(n + 1) // 2, 1] and float32 absmax [ceil(n / blocksize)].
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // Inverse of quantize_4bit with a 16-entry code book; absmax is float32, or
  // uint8 with nested_absmax/nested_code/offset (double quantization).
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
      "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // Nearest entry of a sorted 256-entry code after scaling each block by its
  // absmax; returns uint8 codes (A's shape) and float32 absmax.
  m.def("quantize_8bit_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_8bit_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, "
      "ScalarType dtype) -> Tensor");
  m.def("dynamic_map(bool signed) -> Tensor", &dynamic_map);

  // ---- gemm/ : 4-bit weight matmul (forward and the backward for x) ----
  // out[..., N] = x[..., K] @ dequant(W)[N, K]^T (+ bias); W is the packed
  // 4-bit weight with the scale arguments of dequantize_4bit, in its order.
  // out has x's dtype; bias (optional) is [N] in x's dtype.
  m.def(
      "gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt N, SymInt K, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256, "
      "Tensor? bias=None) -> Tensor");
  // out[..., K] = g[..., N] @ dequant(W)[N, K]: the gradient of gemm_4bit
  // with respect to x.
  m.def(
      "gemm_4bit_t(Tensor g, Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt N, SymInt K, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) "
      "-> Tensor");
  // ---- end gemm/ ----
}

// lowbit._C is a plain extension module: loading it runs the registrations
// above; everything is reached through torch.ops.lowbit.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
