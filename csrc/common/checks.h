#pragma once
// Argument checks shared by every op. Each message names the op, the argument,
// the value it got and what would be accepted.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>

#include "core/codebook.h"

namespace lowbit {

// Error messages are assembled here into one std::string: numbers through
// std::to_string/snprintf, never through iostream number formatting. A
// toolchain that links its own libstdc++ into the extension (seen with
// compilers whose spec adds -static-libstdc++) has an uninitialised copy of
// the locale facets, and `stream << int64_t` there crashes the process
// instead of raising the error.
namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::string_view s) { return std::string(s.data(), s.size()); }
inline std::string piece(bool v) { return v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
std::string piece(T v) { return std::to_string(v); }
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string r = "[";
  for (size_t i = 0; i < a.size(); ++i) r += (i ? ", " : "") + std::to_string(a[i]);
  return r + "]";
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string r;
  ((r += detail::piece(args)), ...);
  return r;
}

#define LOWBIT_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::lowbit::message(__VA_ARGS__))

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  LOWBIT_CHECK(t.defined(), op, ": argument '", name, "' is an undefined tensor");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  check_defined(op, name, t);
  LOWBIT_CHECK(t.scalar_type() == want, op, ": argument '", name, "' must have dtype ", want,
               ", got ", t.scalar_type());
}

inline void check_float_dtype(const char* op, const char* name, at::ScalarType dt) {
  LOWBIT_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": argument '", name,
               "' must be float32, float16 or bfloat16, got ", dt);
}

inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t want) {
  LOWBIT_CHECK(t.numel() == want, op, ": argument '", name, "' must have ", want,
               " elements, got ", t.numel(), " (shape ", t.sizes(), ")");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  LOWBIT_CHECK(t.device() == ref.device(), op, ": argument '", name, "' is on ", t.device(),
               " but '", ref_name, "' is on ", ref.device(), "; move both to the same device");
}

inline bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// log2 of a power of two (block sizes: shifts instead of divisions on the GPU).
inline int log2_int(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

// Block sizes the 4-bit format allows (and the 8-bit blockwise ops accept).
inline void check_blocksize(const char* op, const char* name, int64_t blocksize) {
  LOWBIT_CHECK(is_power_of_two(blocksize) && blocksize >= 32 && blocksize <= 4096, op,
               ": argument '", name, "' must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ",
               blocksize);
}

inline core::QuantType parse_quant_type(const char* op, const std::string& qt) {
  if (qt == "nf4") return core::QuantType::NF4;
  if (qt == "fp4") return core::QuantType::FP4;
  LOWBIT_CHECK(false, op, ": argument 'quant_type' must be 'nf4' or 'fp4', got '", qt, "'");
  return core::QuantType::NF4;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lowbit

// Dispatch over the three floating types lowbit accepts (fp32, fp16, bf16).
#include <ATen/Dispatch.h>
#define LOWBIT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// The 16-bit types the tensor-core paths take.
#define LOWBIT_DISPATCH_HALF_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lowbit {
// The device a CUDA kernel should run on: that of the first CUDA tensor among
// its arguments. The dispatcher picks the CUDA kernel when any argument is on
// CUDA; guarding on a CPU argument would fail before the device check can
// report the mismatch clearly.
inline std::optional<c10::Device> cuda_device_of(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    if (t != nullptr && t->defined() && t->is_cuda()) return t->device();
  return std::nullopt;
}
}  // namespace lowbit
