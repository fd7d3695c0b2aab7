#pragma once
// The arguments that describe one 4-bit quantized weight, validated once and
// shared by dequantize and the matmul ops: packed codes, per-block scales
// (float32, or uint8 with a nested 8-bit level), and the 16-entry code book.
#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"
#include "core/blockwise.h"

namespace lowbit {

struct WeightQuant {
  at::Tensor packed;  // uint8, contiguous, (numel + 1) / 2 bytes
  at::Tensor absmax;  // float32 [nblocks], or uint8 [nblocks] when nested
  at::Tensor code;    // float32 [16]
  int64_t blocksize = 64;
  int64_t numel = 0;
  int64_t nblocks = 0;
  // Double quantization: absmax[j] = nested_code[absmax_q[j]] * nested_absmax[j / nested_blocksize] + offset
  at::Tensor nested_absmax;  // float32 [ceil(nblocks / nested_blocksize)]
  at::Tensor nested_code;    // float32 [256]
  at::Tensor offset;         // float32, one element
  int64_t nested_blocksize = 256;

  bool nested() const { return nested_absmax.defined(); }
};

inline WeightQuant check_weight_quant(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                      const at::Tensor& code, int64_t blocksize,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                      int64_t numel) {
  WeightQuant w;
  check_blocksize(op, "blocksize", blocksize);
  LOWBIT_CHECK(numel >= 0, op, ": the weight's element count must be >= 0, got ", numel);
  check_dtype(op, "packed", packed, at::kByte);
  check_numel(op, "packed", packed, (numel + 1) / 2);
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 16);
  check_same_device(op, "code", code, packed, "packed");
  check_defined(op, "absmax", absmax);
  check_same_device(op, "absmax", absmax, packed, "packed");
  w.blocksize = blocksize;
  w.numel = numel;
  w.nblocks = ceil_div(numel, blocksize);
  check_numel(op, "absmax", absmax, w.nblocks);

  const bool has_nested = nested_absmax.has_value() && nested_absmax->defined();
  const bool has_code = nested_code.has_value() && nested_code->defined();
  const bool has_offset = offset.has_value() && offset->defined();
  if (has_nested) {
    LOWBIT_CHECK(has_code && has_offset, op,
                 ": double-quantized scales need all of 'nested_absmax', 'nested_code' and 'offset'");
    check_blocksize(op, "nested_blocksize", nested_blocksize);
    LOWBIT_CHECK(absmax.scalar_type() == at::kByte, op,
                 ": with 'nested_absmax' given, 'absmax' holds 8-bit codes and must be uint8, got ",
                 absmax.scalar_type());
    check_dtype(op, "nested_absmax", *nested_absmax, at::kFloat);
    check_numel(op, "nested_absmax", *nested_absmax, ceil_div(w.nblocks, nested_blocksize));
    check_dtype(op, "nested_code", *nested_code, at::kFloat);
    check_numel(op, "nested_code", *nested_code, 256);
    check_dtype(op, "offset", *offset, at::kFloat);
    check_numel(op, "offset", *offset, 1);
    check_same_device(op, "nested_absmax", *nested_absmax, packed, "packed");
    check_same_device(op, "nested_code", *nested_code, packed, "packed");
    check_same_device(op, "offset", *offset, packed, "packed");
    w.nested_absmax = nested_absmax->contiguous();
    w.nested_code = nested_code->contiguous();
    w.offset = offset->contiguous();
    w.nested_blocksize = nested_blocksize;
  } else {
    LOWBIT_CHECK(!has_code && !has_offset, op,
                 ": 'nested_code'/'offset' given without 'nested_absmax'");
    LOWBIT_CHECK(absmax.scalar_type() == at::kFloat, op,
                 ": argument 'absmax' must be float32 (or uint8 with 'nested_absmax'), got ",
                 absmax.scalar_type());
  }
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.code = code.contiguous();
  return w;
}

// The scales of a CPU weight in the form the core's reference loops read.
inline core::ScaleSource host_scales(const WeightQuant& w) {
  core::ScaleSource s;
  if (w.nested()) {
    s.absmax_q = w.absmax.const_data_ptr<uint8_t>();
    s.nested_absmax = w.nested_absmax.const_data_ptr<float>();
    s.nested_code = w.nested_code.const_data_ptr<float>();
    s.offset = w.offset.item<float>();
    s.nested_blocksize = w.nested_blocksize;
  } else {
    s.absmax = w.absmax.const_data_ptr<float>();
  }
  return s;
}

}  // namespace lowbit
