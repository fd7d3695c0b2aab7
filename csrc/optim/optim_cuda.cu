// CUDA implementation of lowbit.adamw8bit_step: parameters are grouped by
// dtype and packed kMaxTensors at a time into multi-tensor launches on the
// current stream. No host synchronization: lr may be a device tensor (read by
// the kernel) or a CPU tensor (read here on the host), steps are read (and,
// with increment_steps, counted) by the kernels.
//
// Host cost per parameter is what bounds a step of many small tensors (LoRA
// adapters), so the plan holds raw pointers (optim_common.h) and each launch
// goes out as soon as its tensors are packed.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <vector>

#include "optim/optim_common.h"
#include "optim/optim_kernels.cuh"

namespace lowbit {
namespace {

bool aligned(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0; }

template <typename T>
void launch_group(const std::vector<const AdamTensor*>& group, const cuda::AdamArgs& args, const uint8_t* table,
                  cudaStream_t stream) {
  size_t pos = 0;
  while (pos < group.size()) {
    cuda::AdamTensorList tl;  // filled up to `count`; the kernel reads no further
    int64_t chunks = 0;
    int count = 0;
    for (; pos < group.size() && count < cuda::kMaxTensors; ++pos) {
      const AdamTensor& t = *group[pos];
      const int64_t tchunks = ceil_div(t.n, cuda::kChunk);
      // Grid x is limited to 2^31 - 1 blocks; start a new launch well before.
      if (count > 0 && chunks + tchunks > (int64_t{1} << 30)) break;
      TORCH_CHECK(tchunks < (int64_t{1} << 30), lowbit::message(kAdamOp, ": a parameter of ", t.n, " elements is too large"));
      tl.p[count] = t.p;
      tl.g[count] = t.g;
      tl.s1[count] = t.s1;
      tl.s2[count] = t.s2;
      tl.a1[count] = t.a1;  // nullptr for float32 states
      tl.a2[count] = t.a2;
      tl.step[count] = t.step;
      tl.n[count] = t.n;
      tl.chunk_start[count] = static_cast<int32_t>(chunks);
      uint8_t flags = 0;
      if (t.eight_bit) flags |= cuda::kEightBit;
      // 8-element vector accesses: 16 bytes for 16-bit params, 2x16 for fp32.
      if (aligned(t.p, 16) && aligned(t.g, 16)) flags |= cuda::kVecParam;
      if (aligned(t.s1, 8) && aligned(t.s2, 8)) flags |= cuda::kVecState;
      tl.flags[count] = flags;
      chunks += tchunks;
      ++count;
    }
    tl.chunk_start[count] = static_cast<int32_t>(chunks);
    tl.count = count;
    if (chunks == 0) continue;
    cuda::adamw_multi_tensor_kernel<T>
        <<<static_cast<unsigned>(chunks), cuda::kAdamThreads, 0, stream>>>(tl, args, table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                         at::TensorList absmax1, at::TensorList absmax2, at::TensorList steps, const at::Tensor& lr,
                         const at::Tensor& code1, const at::Tensor& code2, double beta1, double beta2, double eps,
                         double weight_decay, int64_t blocksize, bool increment_steps, int64_t index_base) {
  c10::cuda::OptionalCUDAGuard guard;
  if (code1.is_cuda()) guard.set_device(code1.device());
  AdamPlan plan = plan_adamw8bit(params, grads, state1, state2, absmax1, absmax2, steps, lr, code1, code2, beta1,
                                 beta2, eps, weight_decay, blocksize, index_base);
  if (plan.tensors.empty()) return;
  LOWBIT_CHECK(code1.is_cuda(), kAdamOp, ": argument 'code1' must be on the parameters' CUDA device, got ",
               code1.device());

  cuda::AdamArgs args{};
  args.code1 = plan.code1.const_data_ptr<float>();
  args.code2 = plan.code2.const_data_ptr<float>();
  if (plan.lr.is_cuda()) {
    args.lr_ptr = plan.lr.const_data_ptr<float>();
  } else {
    args.lr_ptr = nullptr;
    args.lr_value = plan.lr.item<float>();  // a CPU tensor: no device synchronization
  }
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  // How many 256-element blocks ahead each warp asks L2 for its next data
  // (sm_90 bulk prefetch). On the H100 one block ahead made the 1.07e9-parameter
  // step 2-5% faster; two or four were 12-33% slower (benchmarks/NOTES_optim.md).
  // LOWBIT_ADAM_PREFETCH (0..4) overrides it for measurements.
  static const int prefetch = [] {
    const char* e = std::getenv("LOWBIT_ADAM_PREFETCH");
    const int v = e ? std::atoi(e) : 1;
    return v < 0 ? 0 : (v > 4 ? 4 : v);
  }();
  args.prefetch = prefetch;

  std::vector<const AdamTensor*> by_type[3];
  bool any_eight_bit = false;
  for (const AdamTensor& t : plan.tensors) {
    if (t.n == 0) continue;
    any_eight_bit |= t.eight_bit;
    const int k = t.dtype == at::kFloat ? 0 : (t.dtype == at::kHalf ? 1 : 2);
    by_type[k].push_back(&t);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The prologue, on the stream before every update: the encode tables of
  // this call's maps (see build_map_cells; a few microseconds, scratch from
  // the caching allocator) and, with increment_steps, the step counts (all of
  // them, an empty parameter's too, before any update reads one).
  at::Tensor table;
  const uint8_t* table_ptr = nullptr;
  if (any_eight_bit) {
    table = at::empty({cuda::kTableBytes}, plan.code1.options().dtype(at::kByte));
    table_ptr = table.const_data_ptr<uint8_t>();
  }
  const size_t nsteps = increment_steps ? plan.tensors.size() : 0;
  size_t done = 0;
  bool tables_pending = any_eight_bit;
  while (tables_pending || done < nsteps) {
    cuda::AdamStepList sl;  // filled up to `count`
    int count = 0;
    for (; done < nsteps && count < cuda::kMaxSteps; ++done) sl.step[count++] = plan.tensors[done].step;
    sl.count = count;
    cuda::adam_prologue_kernel<<<2, 1024, 0, stream>>>(args.code1, args.code2,
                                                       tables_pending ? table.data_ptr<uint8_t>() : nullptr, sl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tables_pending = false;
  }
  if (!by_type[0].empty()) launch_group<float>(by_type[0], args, table_ptr, stream);
  if (!by_type[1].empty()) launch_group<c10::Half>(by_type[1], args, table_ptr, stream);
  if (!by_type[2].empty()) launch_group<c10::BFloat16>(by_type[2], args, table_ptr, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("adamw8bit_step", &adamw8bit_step_cuda); }

}  // namespace lowbit
