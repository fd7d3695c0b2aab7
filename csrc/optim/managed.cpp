// CUDA managed (unified) memory for the paged optimizer states: allocation
// with a deleter that frees it, a pointer-attribute query, and prefetching on
// the current stream. Compiled in every build; without CUDA the allocation
// raises and nothing is managed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>

#include "common/checks.h"

#if defined(LOWBIT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace lowbit {
namespace {

// Bytes allocated by alloc_managed and not yet freed, all devices together.
std::atomic<int64_t> g_managed_bytes{0};

int64_t managed_bytes() { return g_managed_bytes.load(); }

#if defined(LOWBIT_WITH_CUDA)

void free_managed(void* ptr, int64_t nbytes) {
  // Runs from a tensor destructor: report, never throw. cudaFree waits for
  // work still using the memory, so freeing after the last step is safe.
  C10_CUDA_CHECK_WARN(cudaFree(ptr));
  g_managed_bytes -= nbytes;
}

at::Tensor alloc_managed(int64_t nbytes, at::Device device) {
  const char* op = "lowbit.alloc_managed";
  LOWBIT_CHECK(device.is_cuda(), op, ": argument 'device' must be a CUDA device, got ", device);
  LOWBIT_CHECK(nbytes >= 0, op, ": argument 'nbytes' must be >= 0, got ", nbytes);
  const c10::cuda::CUDAGuard guard(device);
  const auto options = at::TensorOptions().dtype(at::kByte).device(at::Device(at::kCUDA, c10::cuda::current_device()));
  if (nbytes == 0) return at::empty({0}, options);
  // Managed memory can be oversubscribed, but on shared machines that can
  // stall the whole GPU; allocate only what the card could hold right now.
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  LOWBIT_CHECK(static_cast<uint64_t>(nbytes) <= free_bytes, op, ": cannot allocate ", nbytes,
               " bytes of managed memory on ", device, ": only ", free_bytes, " of ", total_bytes,
               " bytes are free; lowbit never allocates more managed memory than the card has free");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(nbytes), cudaMemAttachGlobal));
  g_managed_bytes += nbytes;
  return at::from_blob(ptr, {nbytes}, [nbytes](void* p) { free_managed(p, nbytes); }, options);
}

bool is_managed(const at::Tensor& t) {
  if (!t.defined() || !t.is_cuda() || t.data_ptr() == nullptr) return false;
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
  return attr.type == cudaMemoryTypeManaged;
}

void prefetch_managed(at::TensorList tensors) {
  const char* op = "lowbit.prefetch_managed";
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.defined() || t.numel() == 0) continue;
    LOWBIT_CHECK(t.is_cuda(), op, ": argument 'tensors[", i, "]' must be a CUDA tensor, got one on ", t.device());
    const c10::cuda::CUDAGuard guard(t.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index());
#if CUDART_VERSION >= 12020
    cudaMemLocation loc{};
    loc.type = cudaMemLocationTypeDevice;
    loc.id = t.device().index();
#if CUDART_VERSION >= 13000
    C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), loc, 0, stream));
#else
    C10_CUDA_CHECK(cudaMemPrefetchAsync_v2(t.data_ptr(), t.nbytes(), loc, 0, stream));
#endif
#else
    C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), t.device().index(), stream));
#endif
  }
}

#else  // CPU-only build

at::Tensor alloc_managed(int64_t nbytes, at::Device device) {
  LOWBIT_CHECK(false, "lowbit.alloc_managed: lowbit was built without CUDA, so it cannot allocate managed memory on ",
               device, " (", nbytes, " bytes requested)");
  return at::Tensor();
}

bool is_managed(const at::Tensor&) { return false; }

void prefetch_managed(at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i)
    LOWBIT_CHECK(!tensors[i].defined() || tensors[i].numel() == 0 || !tensors[i].is_cuda(),
                 "lowbit.prefetch_managed: lowbit was built without CUDA; got a CUDA tensor at 'tensors[", i, "]'");
}

#endif

}  // namespace

// No tensor argument (alloc_managed) or device-agnostic: one implementation
// for every backend.
TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) {
  m.impl("alloc_managed", &alloc_managed);
  m.impl("is_managed", &is_managed);
  m.impl("prefetch_managed", &prefetch_managed);
  m.impl("managed_bytes", &managed_bytes);
}

}  // namespace lowbit
