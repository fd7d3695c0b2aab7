#pragma once
// The scales of a CUDA weight as the kernels' ScaleArgs (device pointers; the
// nested offset stays on the device, so nothing is read back to the host), and
// the dequantize launch shared by the dequantize_4bit op and the GEMM's
// large-M path.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "common/checks.h"
#include "common/weight_quant.h"
#include "quantize/quantize_kernels.cuh"

namespace lowbit {

inline cuda::ScaleArgs scale_args(const WeightQuant& w) {
  cuda::ScaleArgs s{};
  if (w.nested()) {
    s.absmax_q = w.absmax.const_data_ptr<uint8_t>();
    s.nested_absmax = w.nested_absmax.const_data_ptr<float>();
    s.nested_code = w.nested_code.const_data_ptr<float>();
    s.offset = w.offset.const_data_ptr<float>();
    s.nested_shift = log2_int(w.nested_blocksize);
  } else {
    s.absmax = w.absmax.const_data_ptr<float>();
  }
  return s;
}

// The n elements of `w` into `out` (contiguous, n elements of a float type) on
// `stream`: one thread per kDequantChunks chunks of 8 elements.
inline void launch_dequantize_4bit(const WeightQuant& w, int64_t n, at::Tensor& out, cudaStream_t stream) {
  if (n == 0) return;
  const cuda::ScaleArgs s = scale_args(w);
  const uint8_t* q = w.packed.const_data_ptr<uint8_t>();
  const bool vec_in = (reinterpret_cast<uintptr_t>(q) & 3u) == 0;
  const unsigned grid = static_cast<unsigned>(ceil_div(ceil_div(n, 8 * cuda::kDequantChunks), 256));
  const int shift = log2_int(w.blocksize);
  LOWBIT_DISPATCH_FLOAT_TYPES(out.scalar_type(), "dequantize_4bit", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool vec_out = cuda::aligned16(o);
    if (w.nested())
      cuda::dequantize_4bit_kernel<scalar_t, true>
          <<<grid, 256, 0, stream>>>(q, n, vec_in, vec_out, w.code.const_data_ptr<float>(), s, shift, o);
    else
      cuda::dequantize_4bit_kernel<scalar_t, false>
          <<<grid, 256, 0, stream>>>(q, n, vec_in, vec_out, w.code.const_data_ptr<float>(), s, shift, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lowbit
