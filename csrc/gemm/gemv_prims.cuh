#pragma once
// The warp-level primitives the decode GEMV kernels (gemv_kernels.cuh) are
// written in: cp.async, mma.sync, shuffles, barriers, shared and streaming
// global loads. Each is __host__ __device__: on the device it is the PTX
// instruction; on the host, with LOWBIT_GEMV_EMULATE defined, it calls the
// warp emulator of tests/cpp/gemv_emulator.cu, so the very same kernel body
// runs (lane by lane, with the collective operations emulated) on a machine
// without a GPU. Without LOWBIT_GEMV_EMULATE the host versions are never
// called (the kernels are device code) and only have to compile.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace lowbit {
namespace cuda {
namespace gemv {

#if defined(LOWBIT_GEMV_EMULATE) && !defined(__CUDA_ARCH__)
#define LOWBIT_GEMV_HOST_EMU 1
namespace emu {
int thread_index();
int block_index();
int block_dim();
void syncwarp();
void syncthreads();
uint32_t shfl_xor(uint32_t v, int mask);
uint32_t shfl_idx(uint32_t v, int src);
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
void mma16816(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void check_global(const void* p, int bytes, bool write);
void check_shared(const void* p, int bytes);
uint32_t shared_addr(const void* p);
const void* shared_ptr(uint32_t a, int bytes);
}  // namespace emu
#endif

#if defined(__CUDA_ARCH__)
#define LOWBIT_GEMV_DEV 1
#endif

__host__ __device__ __forceinline__ int thread_index() {
#if defined(LOWBIT_GEMV_DEV)
  return static_cast<int>(threadIdx.x);
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return emu::thread_index();
#else
  return 0;
#endif
}

__host__ __device__ __forceinline__ int block_index() {
#if defined(LOWBIT_GEMV_DEV)
  return static_cast<int>(blockIdx.x);
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return emu::block_index();
#else
  return 0;
#endif
}

__host__ __device__ __forceinline__ int block_dim() {
#if defined(LOWBIT_GEMV_DEV)
  return static_cast<int>(blockDim.x);
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return emu::block_dim();
#else
  return 1;
#endif
}

__host__ __device__ __forceinline__ void syncwarp() {
#if defined(LOWBIT_GEMV_DEV)
  __syncwarp();
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::syncwarp();
#endif
}

__host__ __device__ __forceinline__ void syncthreads() {
#if defined(LOWBIT_GEMV_DEV)
  __syncthreads();
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::syncthreads();
#endif
}

__host__ __device__ __forceinline__ uint32_t shfl_xor(uint32_t v, int mask) {
#if defined(LOWBIT_GEMV_DEV)
  return __shfl_xor_sync(0xffffffffu, v, mask);
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return emu::shfl_xor(v, mask);
#else
  return v;
#endif
}

// v of lane src (the same src need not be asked by every lane).
__host__ __device__ __forceinline__ float shfl_idx(float v, int src) {
#if defined(LOWBIT_GEMV_DEV)
  return __shfl_sync(0xffffffffu, v, src);
#elif defined(LOWBIT_GEMV_HOST_EMU)
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b = emu::shfl_idx(b, src);
  float r;
  std::memcpy(&r, &b, 4);
  return r;
#else
  (void)src;
  return v;
#endif
}

// ---------------------------------------------------------------- cp.async
// Asynchronous global -> shared copies of BYTES (4, 8 or 16); only the first
// src_bytes are read, the rest of the destination is zero-filled (src_bytes 0:
// nothing is read). CA keeps the line in L1 (data other warps read again),
// otherwise L1 is bypassed (the weight stream, read once).
template <int BYTES, bool CA>
__host__ __device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  static_assert(CA || BYTES == 16, "cp.async.cg copies 16 bytes");
#if defined(LOWBIT_GEMV_DEV)
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (CA)
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::cp_async(dst, src, BYTES, src_bytes);
#endif
}

__host__ __device__ __forceinline__ void cp_async_commit() {
#if defined(LOWBIT_GEMV_DEV)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::cp_async_commit();
#endif
}

// Waits until at most `pending` of this thread's committed groups are in flight.
template <int PENDING>
__host__ __device__ __forceinline__ void cp_async_wait() {
#if defined(LOWBIT_GEMV_DEV)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::cp_async_wait(PENDING);
#endif
}

// ---------------------------------------------------------------- tensor cores
// d += a * b, m16n8k16, fp32 accumulators; T = c10::BFloat16 or c10::Half.
template <typename T>
__host__ __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(LOWBIT_GEMV_DEV)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(LOWBIT_GEMV_HOST_EMU)
  emu::mma16816(std::is_same_v<T, c10::BFloat16>, d, a, b0, b1);
#endif
}

// ---------------------------------------------------------------- loads
// Shared-memory loads (plain loads: the compiler emits LDS for pointers into
// the dynamic shared buffer; the host version checks the bounds).
template <typename V>
__host__ __device__ __forceinline__ V lds(const void* p) {
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_shared(p, sizeof(V));
#endif
  return *reinterpret_cast<const V*>(p);
}

template <typename V>
__host__ __device__ __forceinline__ void sts(void* p, V v) {
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_shared(p, sizeof(V));
#endif
  *reinterpret_cast<V*>(p) = v;
}

// 32-bit shared-window addresses: the kernels compute their shared addresses
// themselves (lane constants XOR compile-time offsets), and these loads keep
// the compiler from re-splitting them into base + offset additions.
__host__ __device__ __forceinline__ uint32_t shared_addr(const void* p) {
#if defined(LOWBIT_GEMV_DEV)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return emu::shared_addr(p);
#else
  (void)p;
  return 0;
#endif
}

// Hides how v was computed, so that additions into it are not re-associated.
__host__ __device__ __forceinline__ uint32_t opaque(uint32_t v) {
#if defined(LOWBIT_GEMV_DEV)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

template <typename V>
__host__ __device__ __forceinline__ V ld_shared(uint32_t a) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8 || sizeof(V) == 16, "4, 8 or 16 bytes");
#if defined(LOWBIT_GEMV_DEV)
  V v;
  if constexpr (sizeof(V) == 4) {
    uint32_t r;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(a));
    v = *reinterpret_cast<V*>(&r);
  } else if constexpr (sizeof(V) == 8) {
    uint2 r;
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(r.x), "=r"(r.y) : "r"(a));
    v = *reinterpret_cast<V*>(&r);
  } else {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
    v = *reinterpret_cast<V*>(&r);
  }
  return v;
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return *static_cast<const V*>(emu::shared_ptr(a, sizeof(V)));
#else
  (void)a;
  return V{};
#endif
}

__host__ __device__ __forceinline__ uint32_t ld_shared_u8(uint32_t a) {
#if defined(LOWBIT_GEMV_DEV)
  uint32_t r;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(r) : "r"(a));
  return r;
#elif defined(LOWBIT_GEMV_HOST_EMU)
  return *static_cast<const uint8_t*>(emu::shared_ptr(a, 1));
#else
  (void)a;
  return 0;
#endif
}

// Read-only global load through the texture path.
template <typename V>
__host__ __device__ __forceinline__ V ldg(const V* p) {
#if defined(LOWBIT_GEMV_DEV)
  return __ldg(p);
#else
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_global(p, sizeof(V), false);
#endif
  return *p;
#endif
}

// 16 bytes of the weight stream into registers, not allocated in L1.
__host__ __device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 v;
#if defined(LOWBIT_GEMV_DEV)
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#else
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_global(p, 16, false);
#endif
  v = *reinterpret_cast<const uint4*>(p);
#endif
  return v;
}

__host__ __device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(LOWBIT_GEMV_DEV)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

// Global store of the result (bounds-checked on the host).
template <typename V>
__host__ __device__ __forceinline__ void stg(V* p, V v) {
#if defined(LOWBIT_GEMV_HOST_EMU)
  emu::check_global(p, sizeof(V), true);
#endif
  *p = v;
}

// ---------------------------------------------------------------- arithmetic

// Byte J of w in one instruction. A prmt in asm for every J: given a plain
// `w & 0xFF` or `w >> 24`, the compiler folds the following `<< 7` into a
// shift-and-mask and then needs a third instruction for the table base.
template <int J>
__host__ __device__ __forceinline__ uint32_t byte_of(uint32_t w) {
  static_assert(J >= 0 && J < 4, "byte 0..3");
#if defined(LOWBIT_GEMV_DEV)
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(w), "n"(0x4440 + J));
  return r;
#else
  return (w >> (8 * J)) & 0xFFu;
#endif
}

// fp32 multiply without contraction into an FMA (the nested scale is the
// rounded product plus the offset, as the dequantize kernels compute it).
__host__ __device__ __forceinline__ float fmul_rn(float a, float b) {
#if defined(LOWBIT_GEMV_DEV)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}

// The 16-bit pattern of v rounded to T (nearest even).
template <typename T>
__host__ __device__ __forceinline__ uint32_t bits16(float v) {
  return static_cast<uint32_t>(T(v).x);
}

// The value of a 16-bit pattern of T.
template <typename T>
__host__ __device__ __forceinline__ float from_bits16(uint32_t b) {
  T v;
  v.x = static_cast<uint16_t>(b);
  return static_cast<float>(v);
}

}  // namespace gemv
}  // namespace cuda
}  // namespace lowbit
