#pragma once
// Argument checks of lowbit.adamw8bit_step shared by the CPU and CUDA
// implementations, so both accept and reject exactly the same inputs.
#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "core/adamw8bit.h"

namespace lowbit {

constexpr const char* kAdamOp = "lowbit.adamw8bit_step";

// One parameter's view of the op arguments after validation.
struct AdamTensor {
  at::Tensor p, g, s1, s2, a1, a2, step;
  int64_t n;
  bool eight_bit;  // uint8 states with float32 absmax, else float32 states
};

struct AdamPlan {
  std::vector<AdamTensor> tensors;
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
inline std::string item_name(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline AdamPlan plan_adamw8bit(at::TensorList params, at::TensorList grads, at::TensorList state1,
                               at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                               at::TensorList steps, const at::Tensor& lr, const at::Tensor& code1,
                               const at::Tensor& code2, double beta1, double beta2, double eps, double weight_decay,
                               int64_t blocksize) {
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

  plan.tensors.reserve(np);
  for (size_t i = 0; i < np; ++i) {
    const std::string pn = item_name("params", i), gn = item_name("grads", i);
    const std::string s1n = item_name("state1", i), s2n = item_name("state2", i);
    const std::string a1n = item_name("absmax1", i), a2n = item_name("absmax2", i), stn = item_name("steps", i);
    AdamTensor t;
    t.p = params[i];
    check_defined(kAdamOp, pn.c_str(), t.p);
    check_float_dtype(kAdamOp, pn.c_str(), t.p.scalar_type());
    LOWBIT_CHECK(t.p.is_contiguous(), kAdamOp, ": argument '", pn, "' must be contiguous (it is updated in place), got strides ",
                 t.p.strides(), " for shape ", t.p.sizes());
    LOWBIT_CHECK(t.p.device() == code1.device(), kAdamOp, ": argument '", pn, "' is on ", t.p.device(),
                 " but 'code1' is on ", code1.device(), "; the maps must be on the parameters' device");
    LOWBIT_CHECK(lr.device() == t.p.device() || lr.device().is_cpu(), kAdamOp, ": argument 'lr' is on ", lr.device(),
                 " but '", pn, "' is on ", t.p.device(), "; pass lr on the parameters' device or on the CPU");
    t.n = t.p.numel();

    check_defined(kAdamOp, gn.c_str(), grads[i]);
    LOWBIT_CHECK(grads[i].layout() == at::kStrided, kAdamOp, ": argument '", gn,
                 "' is a sparse gradient; AdamW8bit supports dense gradients only");
    check_dtype(kAdamOp, gn.c_str(), grads[i], t.p.scalar_type());
    LOWBIT_CHECK(grads[i].sizes() == t.p.sizes(), kAdamOp, ": argument '", gn, "' has shape ", grads[i].sizes(),
                 " but '", pn, "' has shape ", t.p.sizes());
    check_same_device(kAdamOp, gn.c_str(), grads[i], t.p, pn.c_str());
    t.g = grads[i].contiguous();

    t.s1 = state1[i];
    t.s2 = state2[i];
    check_defined(kAdamOp, s1n.c_str(), t.s1);
    check_defined(kAdamOp, s2n.c_str(), t.s2);
    LOWBIT_CHECK(t.s1.scalar_type() == at::kByte || t.s1.scalar_type() == at::kFloat, kAdamOp, ": argument '", s1n,
                 "' must be uint8 (8-bit state) or float32 (full-precision state), got ", t.s1.scalar_type());
    t.eight_bit = t.s1.scalar_type() == at::kByte;
    check_dtype(kAdamOp, s2n.c_str(), t.s2, t.s1.scalar_type());
    for (const auto* st : {&t.s1, &t.s2}) {
      const std::string& nm = (st == &t.s1) ? s1n : s2n;
      check_numel(kAdamOp, nm.c_str(), *st, t.n);
      check_same_device(kAdamOp, nm.c_str(), *st, t.p, pn.c_str());
      LOWBIT_CHECK(st->is_contiguous(), kAdamOp, ": argument '", nm, "' must be contiguous (it is updated in place)");
    }
    t.a1 = absmax1[i];
    t.a2 = absmax2[i];
    const int64_t want_blocks = t.eight_bit ? ceil_div(t.n, core::kAdamBlock) : 0;
    for (const auto* am : {&t.a1, &t.a2}) {
      const std::string& nm = (am == &t.a1) ? a1n : a2n;
      check_dtype(kAdamOp, nm.c_str(), *am, at::kFloat);
      LOWBIT_CHECK(am->numel() == want_blocks, kAdamOp, ": argument '", nm, "' must have ", want_blocks,
                   " elements (", t.eight_bit ? "one per block of 256 of a uint8 state" : "none for float32 states",
                   "), got ", am->numel());
      if (want_blocks > 0) {
        check_same_device(kAdamOp, nm.c_str(), *am, t.p, pn.c_str());
        LOWBIT_CHECK(am->is_contiguous(), kAdamOp, ": argument '", nm, "' must be contiguous");
      }
    }
    t.step = steps[i];
    check_dtype(kAdamOp, stn.c_str(), t.step, at::kFloat);
    check_numel(kAdamOp, stn.c_str(), t.step, 1);
    check_same_device(kAdamOp, stn.c_str(), t.step, t.p, pn.c_str());
    plan.tensors.push_back(std::move(t));
  }
  return plan;
}

}  // namespace lowbit
