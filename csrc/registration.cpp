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

  // ---- optim/ : AdamW with blockwise 8-bit states, managed memory for paging ----
  // One AdamW step, in place, for a list of parameters sharing lr/betas/eps/
  // weight_decay (one parameter group). Per parameter i: state1[i]/state2[i]
  // are m and v, either uint8 codes (params' numel; m in code1, the signed
  // map, v in code2, the unsigned map) with float32 absmax1[i]/absmax2[i] per
  // block of `blocksize` (= 256), or float32 with empty absmax. steps[i] is a
  // float32 scalar holding the step count including this step (>= 1); with
  // increment_steps the op first adds 1 to every steps[i] itself (as
  // torch._foreach_add_(steps, 1) before the call would: the optimizer's way,
  // which spares it a second pass over the list). lr is a float32 scalar on
  // the params' device or the CPU. Decay is applied before the update
  // (torch.optim.AdamW's order); a non-finite gradient element leaves its
  // parameter and states unchanged. All arguments are checked before anything
  // is written: a rejected call changes nothing. index_base only numbers the
  // parameters in messages (params[index_base + i]), for a caller that passes
  // one slice of its list per call.
  m.def(
      "adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor(f!)[] steps, Tensor lr, Tensor code1, Tensor code2, "
      "float beta1, float beta2, float eps, float weight_decay, int blocksize=256, bool increment_steps=False, int index_base=0) -> ()");
  // uint8 [nbytes] in CUDA managed memory on `device`, freed with the tensor;
  // refuses to allocate more than the device has free.
  m.def("alloc_managed(int nbytes, Device device) -> Tensor");
  // Whether t's memory is CUDA managed memory (false on the CPU).
  m.def("is_managed(Tensor t) -> bool");
  // Asynchronously migrates managed tensors to their device, on its current stream.
  m.def("prefetch_managed(Tensor[] tensors) -> ()");
  // Bytes of managed memory allocated by alloc_managed and not yet freed.
  m.def("managed_bytes() -> int");
}

// lowbit._C is a plain extension module: loading it runs the registrations
// above; everything is reached through torch.ops.lowbit.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
