// CPU implementation of lowbit.adamw8bit_step: the reference the CUDA kernel
// matches bit for bit (same element math from core/adamw8bit.h), parallel
// over 256-element blocks within each parameter.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/adamw8bit.h"
#include "optim/optim_common.h"

namespace lowbit {
namespace {

// Blocks per parallel task: enough work to amortise the task overhead.
constexpr int64_t kGrainBlocks = 64;

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                        at::TensorList absmax1, at::TensorList absmax2, at::TensorList steps, const at::Tensor& lr,
                        const at::Tensor& code1, const at::Tensor& code2, double beta1, double beta2, double eps,
                        double weight_decay, int64_t blocksize, bool increment_steps, int64_t index_base) {
  AdamPlan plan = plan_adamw8bit(params, grads, state1, state2, absmax1, absmax2, steps, lr, code1, code2, beta1,
                                 beta2, eps, weight_decay, blocksize, index_base);
  if (plan.tensors.empty()) return;
  // All counts first, then the updates: as torch._foreach_add_(steps, 1)
  // followed by the op, also when a step tensor appears twice.
  if (increment_steps)
    for (const AdamTensor& t : plan.tensors) *t.step = *t.step + 1.0f;
  const float lr_value = plan.lr.item<float>();
  const float* c1 = plan.code1.const_data_ptr<float>();
  const float* c2 = plan.code2.const_data_ptr<float>();
  for (const AdamTensor& t : plan.tensors) {
    if (t.n == 0) continue;
    const core::AdamWScalars s = core::make_scalars(lr_value, *t.step, beta1, beta2, eps, weight_decay);
    LOWBIT_DISPATCH_FLOAT_TYPES(t.dtype, "adamw8bit_step_cpu", [&] {
      scalar_t* p = static_cast<scalar_t*>(t.p);
      const scalar_t* g = static_cast<const scalar_t*>(t.g);
      if (t.eight_bit) {
        uint8_t* q1 = static_cast<uint8_t*>(t.s1);
        uint8_t* q2 = static_cast<uint8_t*>(t.s2);
        float* a1 = t.a1;
        float* a2 = t.a2;
        const int64_t nblocks = ceil_div(t.n, core::kAdamBlock);
        at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t start = b * core::kAdamBlock;
            const int count = static_cast<int>(std::min<int64_t>(core::kAdamBlock, t.n - start));
            core::adamw8bit_block(s, c1, c2, p + start, g + start, q1 + start, q2 + start, a1 + b, a2 + b, count);
          }
        });
      } else {
        float* m = static_cast<float*>(t.s1);
        float* v = static_cast<float*>(t.s2);
        at::parallel_for(0, t.n, kGrainBlocks * core::kAdamBlock, [&](int64_t i0, int64_t i1) {
          core::adamw32_range(s, p + i0, g + i0, m + i0, v + i0, i1 - i0);
        });
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("adamw8bit_step", &adamw8bit_step_cpu); }

}  // namespace lowbit
