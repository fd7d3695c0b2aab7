#pragma once
// The scales of a CUDA weight as the kernels' ScaleArgs (device pointers; the
// nested offset stays on the device, so nothing is read back to the host).
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

}  // namespace lowbit
