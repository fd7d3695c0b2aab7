#pragma once
// Argument checks of lowbit.adamw8bit_step shared by the CPU and CUDA
// implementations, so both accept and reject exactly the same inputs.
//
// The optimizer calls the op once per step with seven lists of one tensor per
// parameter, so the checks run for thousands of tensors per second and must
// cost nanoseconds, not microseconds, each: on the success path they build no
// strings and copy no at::Tensor (a copy is an atomic refcount update, and for
// a tensor owned by Python also a Python reference taken under the GIL). The
// plan keeps raw pointers: the caller's lists outlive the call. Messages are
// assembled only once a check has failed, by running the same checks again in
// explaining mode (check_param<true>), so both modes test the very same
// conditions and the first failing check names the argument exactly as before.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "common/checks.h"
#include "core/adamw8bit.h"

namespace lowbit {

constexpr const char* kAdamOp = "lowbit.adamw8bit_step";

// One parameter's view of the op arguments after validation. Pointers are
// filled only where the kernels read them: none for an empty parameter, no
// absmax for float32 states.
struct AdamTensor {
  void* p;
  const void* g;
  void* s1;
  void* s2;
  float* a1;
  float* a2;
  float* step;
  int64_t n;
  at::ScalarType dtype;
  bool eight_bit;  // uint8 states with float32 absmax, else float32 states
};

struct AdamPlan {
  std::vector<AdamTensor> tensors;
  std::vector<at::Tensor> grad_copies;  // contiguous copies of non-contiguous gradients, alive for the call
  at::Tensor code1, code2;
  at::Tensor lr;
  double beta1, beta2, eps, weight_decay;
};

inline void check_hyper(double beta1, double beta2, double eps, double weight_decay) {
  LOWBIT_CHECK(beta1 >= 0.0 && beta1 < 1.0, kAdamOp, ": argument 'beta1' must be in [0, 1), got ", beta1);
  LOWBIT_CHECK(beta2 >= 0.0 && beta2 < 1.0, kAdamOp, ": argument 'beta2' must be in [0, 1), got ", beta2);
  LOWBIT_CHECK(eps >= 0.0, kAdamOp, ": argument 'eps' must be >= 0, got ", eps);
  LOWBIT_CHECK(weight_decay >= 0.0, kAdamOp, ": argument 'weight_decay' must be >= 0, got ", weight_decay);
}

inline void check_list_size(const char* name, size_t got, size_t want) {
  LOWBIT_CHECK(got == want, kAdamOp, ": argument '", name, "' has ", got, " tensors but 'params' has ", want,
               "; pass one per parameter");
}

// `name[i]`, for messages about one element of a tensor list.
inline std::string item_name(const char* name, int64_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// One condition of check_param: in explaining mode a failure raises the
// message (the same text the shared helpers of common/checks.h give), in
// fast mode it only reports false. The message arguments are evaluated only
// on failure in explaining mode.
#define LOWBIT_ADAM_REQUIRE(cond, ...)                                     \
  do {                                                                     \
    if (C10_UNLIKELY(!(cond))) {                                           \
      if constexpr (Explain) LOWBIT_CHECK(false, kAdamOp, __VA_ARGS__);    \
      return false;                                                        \
    }                                                                      \
  } while (0)

// The checks of parameter i, in the order that decides which message a call
// with several faults gets. The message fragments mirror check_defined,
// check_dtype, check_float_dtype, check_numel and check_same_device.
template <bool Explain>
bool check_param(int64_t i, const at::Tensor& p, const at::Tensor& g, const at::Tensor& s1, const at::Tensor& s2,
                 const at::Tensor& a1, const at::Tensor& a2, const at::Tensor& step, const at::Tensor& lr,
                 const at::Tensor& code1) {
  // Names are built only in explaining mode, and only when a message needs them.
  auto pn = [&] { return item_name("params", i); };
  auto gn = [&] { return item_name("grads", i); };
  auto sn = [&](int k) { return item_name(k == 1 ? "state1" : "state2", i); };
  auto an = [&](int k) { return item_name(k == 1 ? "absmax1" : "absmax2", i); };
  auto stn = [&] { return item_name("steps", i); };

  LOWBIT_ADAM_REQUIRE(p.defined(), ": argument '", pn(), "' is an undefined tensor");
  const at::ScalarType dt = p.scalar_type();
  LOWBIT_ADAM_REQUIRE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, ": argument '", pn(),
                      "' must be float32, float16 or bfloat16, got ", dt);
  LOWBIT_ADAM_REQUIRE(p.is_contiguous(), ": argument '", pn(), "' must be contiguous (it is updated in place), got strides ",
                      p.strides(), " for shape ", p.sizes());
  const c10::Device dev = p.device();
  LOWBIT_ADAM_REQUIRE(dev == code1.device(), ": argument '", pn(), "' is on ", dev, " but 'code1' is on ",
                      code1.device(), "; the maps must be on the parameters' device");
  LOWBIT_ADAM_REQUIRE(lr.device() == dev || lr.device().is_cpu(), ": argument 'lr' is on ", lr.device(), " but '", pn(),
                      "' is on ", dev, "; pass lr on the parameters' device or on the CPU");
  const int64_t n = p.numel();

  LOWBIT_ADAM_REQUIRE(g.defined(), ": argument '", gn(), "' is an undefined tensor");
  LOWBIT_ADAM_REQUIRE(g.layout() == at::kStrided, ": argument '", gn(),
                      "' is a sparse gradient; AdamW8bit supports dense gradients only");
  LOWBIT_ADAM_REQUIRE(g.scalar_type() == dt, ": argument '", gn(), "' must have dtype ", dt, ", got ", g.scalar_type());
  LOWBIT_ADAM_REQUIRE(g.sizes() == p.sizes(), ": argument '", gn(), "' has shape ", g.sizes(), " but '", pn(),
                      "' has shape ", p.sizes());
  LOWBIT_ADAM_REQUIRE(g.device() == dev, ": argument '", gn(), "' is on ", g.device(), " but '", pn(), "' is on ", dev,
                      "; move both to the same device");

  LOWBIT_ADAM_REQUIRE(s1.defined(), ": argument '", sn(1), "' is an undefined tensor");
  LOWBIT_ADAM_REQUIRE(s2.defined(), ": argument '", sn(2), "' is an undefined tensor");
  const at::ScalarType st = s1.scalar_type();
  LOWBIT_ADAM_REQUIRE(st == at::kByte || st == at::kFloat, ": argument '", sn(1),
                      "' must be uint8 (8-bit state) or float32 (full-precision state), got ", st);
  const bool eight_bit = st == at::kByte;
  LOWBIT_ADAM_REQUIRE(s2.scalar_type() == st, ": argument '", sn(2), "' must have dtype ", st, ", got ", s2.scalar_type());
  for (int k = 1; k <= 2; ++k) {
    const at::Tensor& s = k == 1 ? s1 : s2;
    LOWBIT_ADAM_REQUIRE(s.numel() == n, ": argument '", sn(k), "' must have ", n, " elements, got ", s.numel(),
                        " (shape ", s.sizes(), ")");
    LOWBIT_ADAM_REQUIRE(s.device() == dev, ": argument '", sn(k), "' is on ", s.device(), " but '", pn(), "' is on ",
                        dev, "; move both to the same device");
    LOWBIT_ADAM_REQUIRE(s.is_contiguous(), ": argument '", sn(k), "' must be contiguous (it is updated in place)");
  }
  const int64_t want_blocks = eight_bit ? ceil_div(n, core::kAdamBlock) : 0;
  for (int k = 1; k <= 2; ++k) {
    const at::Tensor& a = k == 1 ? a1 : a2;
    LOWBIT_ADAM_REQUIRE(a.defined(), ": argument '", an(k), "' is an undefined tensor");
    LOWBIT_ADAM_REQUIRE(a.scalar_type() == at::kFloat, ": argument '", an(k), "' must have dtype ", at::kFloat, ", got ",
                        a.scalar_type());
    LOWBIT_ADAM_REQUIRE(a.numel() == want_blocks, ": argument '", an(k), "' must have ", want_blocks, " elements (",
                        eight_bit ? "one per block of 256 of a uint8 state" : "none for float32 states", "), got ",
                        a.numel());
    if (want_blocks > 0) {
      LOWBIT_ADAM_REQUIRE(a.device() == dev, ": argument '", an(k), "' is on ", a.device(), " but '", pn(), "' is on ",
                          dev, "; move both to the same device");
      LOWBIT_ADAM_REQUIRE(a.is_contiguous(), ": argument '", an(k), "' must be contiguous");
    }
  }
  LOWBIT_ADAM_REQUIRE(step.defined(), ": argument '", stn(), "' is an undefined tensor");
  LOWBIT_ADAM_REQUIRE(step.scalar_type() == at::kFloat, ": argument '", stn(), "' must have dtype ", at::kFloat, ", got ",
                      step.scalar_type());
  LOWBIT_ADAM_REQUIRE(step.numel() == 1, ": argument '", stn(), "' must have ", int64_t{1}, " elements, got ",
                      step.numel(), " (shape ", step.sizes(), ")");
  LOWBIT_ADAM_REQUIRE(step.device() == dev, ": argument '", stn(), "' is on ", step.device(), " but '", pn(),
                      "' is on ", dev, "; move both to the same device");
  return true;
}

#undef LOWBIT_ADAM_REQUIRE

inline AdamPlan plan_adamw8bit(at::TensorList params, at::TensorList grads, at::TensorList state1,
                               at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                               at::TensorList steps, const at::Tensor& lr, const at::Tensor& code1,
                               const at::Tensor& code2, double beta1, double beta2, double eps, double weight_decay,
                               int64_t blocksize, int64_t index_base) {
  const size_t np = params.size();
  check_list_size("grads", grads.size(), np);
  check_list_size("state1", state1.size(), np);
  check_list_size("state2", state2.size(), np);
  check_list_size("absmax1", absmax1.size(), np);
  check_list_size("absmax2", absmax2.size(), np);
  check_list_size("steps", steps.size(), np);
  check_hyper(beta1, beta2, eps, weight_decay);
  LOWBIT_CHECK(blocksize == core::kAdamBlock, kAdamOp, ": argument 'blocksize' must be ", core::kAdamBlock,
               " (the block of one float32 absmax), got ", blocksize);

  AdamPlan plan;
  plan.beta1 = beta1;
  plan.beta2 = beta2;
  plan.eps = eps;
  plan.weight_decay = weight_decay;

  check_dtype(kAdamOp, "lr", lr, at::kFloat);
  check_numel(kAdamOp, "lr", lr, 1);
  check_dtype(kAdamOp, "code1", code1, at::kFloat);
  check_numel(kAdamOp, "code1", code1, 256);
  check_dtype(kAdamOp, "code2", code2, at::kFloat);
  check_numel(kAdamOp, "code2", code2, 256);
  check_same_device(kAdamOp, "code2", code2, code1, "code1");
  plan.code1 = code1.contiguous();
  plan.code2 = code2.contiguous();
  plan.lr = lr;

  // Every parameter is checked before anything is read or written, so a
  // rejected call changes nothing.
  for (size_t i = 0; i < np; ++i) {
    if (C10_UNLIKELY(!check_param<false>(0, params[i], grads[i], state1[i], state2[i], absmax1[i], absmax2[i],
                                         steps[i], lr, code1))) {
      check_param<true>(index_base + static_cast<int64_t>(i), params[i], grads[i], state1[i], state2[i], absmax1[i],
                        absmax2[i], steps[i], lr, code1);
      TORCH_INTERNAL_ASSERT(false, kAdamOp, ": the fast and the explaining checks of parameter ", i, " disagree");
    }
  }

  plan.tensors.resize(np);
  for (size_t i = 0; i < np; ++i) {
    const at::Tensor& p = params[i];
    AdamTensor& t = plan.tensors[i];  // value-initialized: null pointers
    t.n = p.numel();
    t.dtype = p.scalar_type();
    t.eight_bit = state1[i].scalar_type() == at::kByte;
    // Untyped accessors: the dtypes are checked above.
    t.step = static_cast<float*>(steps[i].data_ptr());  // every step is counted, an empty parameter's too
    if (t.n == 0) continue;
    t.p = p.data_ptr();
    const at::Tensor& g = grads[i];
    if (g.is_contiguous()) {
      t.g = g.const_data_ptr();
    } else {
      plan.grad_copies.push_back(g.contiguous());
      t.g = plan.grad_copies.back().const_data_ptr();
    }
    t.s1 = state1[i].data_ptr();
    t.s2 = state2[i].data_ptr();
    if (t.eight_bit) {
      t.a1 = static_cast<float*>(absmax1[i].data_ptr());
      t.a2 = static_cast<float*>(absmax2[i].data_ptr());
    }
  }
  return plan;
}

}  // namespace lowbit
