// A CUDA execution model on the host, so that the very kernels of csrc/ compile as C++ and run on the CPU.
//
// Included instead of the CUDA headers when ALAST_EMULATION is defined (see common.cuh). What it emulates:
//
//   * a launch: every block of the grid in turn (x fastest, then y, z); the threads of one block run
//     concurrently, one OS thread each, and see threadIdx/blockIdx/blockDim/gridDim;
//   * __syncthreads(): a real barrier over the threads of the block. A thread that exits while others wait
//     at a barrier, or reaches a barrier after another thread exited, is a fault (a divergent barrier);
//   * warp operations with the _sync semantics: __ballot_sync and __shfl_up/xor_sync wait until every lane
//     named in the mask has arrived at the same operation with the same mask; a calling lane outside its
//     mask, a mask naming lanes that do not exist or have exited, or lanes disagreeing on the mask, is a
//     fault. __popc is a plain bit count;
//   * static __shared__ variables (host statics: blocks run one at a time, launches one at a time) and
//     dynamic shared memory (ALAST_DYNAMIC_SHARED), a fresh buffer per block filled with a garbage
//     pattern, every index checked against the launch's size; static arrays are bounds-checked by the
//     compiler (-fsanitize=bounds, reported by the runtime as a fault);
//   * shared- and global-memory atomics (atomicAdd, atomicExch) as host atomics;
//   * the launch configuration limits of an sm_80/sm_90 GPU (1024 threads a block, 48 KiB of dynamic shared
//     memory without an opt-in, grid dimensions) and device-side assertions (ALAST_DEVICE_CHECK).
//
// A fault stops the launch: the launch status is an error whose message (cudaGetErrorString) names the
// kernel, the block, the thread and what went wrong. docs/cuda-emulation.md says what this cannot show.
#pragma once

#include <atomic>
#include <cfloat>
#include <cmath>
#include <math.h>  // expf, fmaxf in the global namespace, as CUDA code calls them
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// One block runs at a time, so a host static is exactly one block's copy of the variable.
#define __shared__ static

// ------------------------------------------------------------------------------------------ vector types
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };

// The coordinates of the emulated thread running on this OS thread.
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ------------------------------------------------------------------------------------------ runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// The status of the last launch on this host thread, reset by the call (as CUDA's).
cudaError_t cudaGetLastError();
// For the status cudaGetLastError just returned: the emulator's message (kernel, block, thread, what).
const char* cudaGetErrorString(cudaError_t status);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream);

namespace alast {
namespace emu {

// Stop the launch: records the first fault of the launch (with the kernel, block and thread) and unwinds
// the calling thread; the other threads stop at their next barrier or warp operation.
[[noreturn]] void fault(const char* format, ...) __attribute__((format(printf, 1, 2)));
// A failed device-side check (ALAST_DEVICE_CHECK): a fault whose message is the kernel's own.
[[noreturn]] void device_assert(const char* condition, const char* file, int line, const char* format, ...)
    __attribute__((format(printf, 4, 5)));

void syncthreads();
// Waits until every lane of `mask` has called the same warp operation; returns the 32 values they passed
// (entries of lanes outside the mask are unspecified). `op` names the operation in fault messages.
const uint64_t* warp_exchange(const char* op, unsigned int mask, uint64_t value);
unsigned int lane_id();

// The block's dynamic shared memory: base and size in bytes.
unsigned char* dynamic_shared_memory(size_t* bytes);
[[noreturn]] void shared_index_fault(int64_t index, size_t size, size_t element_bytes);

// Dynamic shared memory as an array whose every index is checked against the size the launch gave.
template <typename T>
class SharedArray {
 public:
  SharedArray() {
    size_t bytes = 0;
    data_ = reinterpret_cast<T*>(dynamic_shared_memory(&bytes));
    size_ = bytes / sizeof(T);
  }
  T& operator[](int64_t i) const {
    if (i < 0 || uint64_t(i) >= size_) shared_index_fault(i, size_, sizeof(T));
    return data_[i];
  }

 private:
  T* data_;
  size_t size_;
};

// ------------------------------------------------------------------------------------------ launches
using ThreadBody = void (*)(void* closure);
// Runs `body(closure)` on every thread of every block; the status of the launch. `pretty_name` is
// Launch<Kernel>::name(), from which the kernel's name is read for records and messages.
cudaError_t launch(const char* pretty_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes, ThreadBody body,
                   void* closure);

// ALAST_LAUNCH(grid, block, shared, stream, kernel)(args...): `kernel(args...)` on every emulated thread.
template <auto Kernel>
struct Launch {
  dim3 grid, block;
  size_t shared;

  // GCC spells the template argument out: "... [with auto Kernel = alast::{anonymous}::kernel<...>]".
  static const char* name() { return __PRETTY_FUNCTION__; }

  template <typename... Args>
  void operator()(Args... args) const {
    // Each thread calls the kernel with its own copies of the arguments, as kernel parameters are.
    auto call = [&] { Kernel(args...); };
    auto body = [](void* closure) { (*static_cast<decltype(call)*>(closure))(); };
    launch(name(), grid, block, shared, body, &call);
  }
};

inline unsigned int float_bits(float v) { unsigned int u; std::memcpy(&u, &v, 4); return u; }
inline float bits_float(unsigned int u) { float v; std::memcpy(&v, &u, 4); return v; }

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp values are scalars of up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Lane `src` of the calling lane's `width`-wide segment must be in the mask to be read.
template <typename T>
T shuffle_from(const char* op, unsigned int mask, T own, const uint64_t* values, int src) {
  if (!((mask >> src) & 1u)) fault("%s: source lane %d is not in mask 0x%08x", op, src, mask);
  return src == int(lane_id()) ? own : from_bits<T>(values[src]);
}

}  // namespace emu
}  // namespace alast

#define ALAST_LAUNCH(grid, block, shared, stream, ...) \
  ::alast::emu::Launch<__VA_ARGS__>{dim3(grid), dim3(block), size_t(shared)}
#define ALAST_DYNAMIC_SHARED(type, name) const ::alast::emu::SharedArray<type> name

// ------------------------------------------------------------------------------------------ intrinsics
inline void __syncthreads() { ::alast::emu::syncthreads(); }

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  const uint64_t* v = ::alast::emu::warp_exchange("__ballot_sync", mask, predicate != 0);
  unsigned int result = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && v[lane]) result |= 1u << lane;
  }
  return result;
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  const uint64_t* v = ::alast::emu::warp_exchange("__shfl_up_sync", mask, ::alast::emu::to_bits(var));
  const int lane = int(::alast::emu::lane_id());
  const int segment = lane - lane % width;
  const int src = lane - int(delta);
  if (src < segment) return var;  // no lane below: the caller keeps its own value
  return ::alast::emu::shuffle_from("__shfl_up_sync", mask, var, v, src);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
  const uint64_t* v = ::alast::emu::warp_exchange("__shfl_xor_sync", mask, ::alast::emu::to_bits(var));
  const int lane = int(::alast::emu::lane_id());
  const int src = lane ^ lane_mask;
  if (src / width != lane / width || src >= 32) return var;  // outside the segment: own value
  return ::alast::emu::shuffle_from("__shfl_xor_sync", mask, var, v, src);
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }

// Shared- and global-memory atomics (relaxed, as CUDA's are).
inline int atomicAdd(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicExch(int* address, int value) {
  return std::atomic_ref<int>(*address).exchange(value, std::memory_order_relaxed);
}

// Bit casts and math as the CUDA math library names them.
inline unsigned int __float_as_uint(float v) { return ::alast::emu::float_bits(v); }
inline float __uint_as_float(unsigned int u) { return ::alast::emu::bits_float(u); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }



// ------------------------------------------------------------------------------------------ float16
// IEEE binary16 by bit manipulation (cuda_fp16.h's __half is opaque storage plus conversions).
struct __half {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1F) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return __uint_as_float(sign);  // ±0
  // Subnormal: value = mantissa · 2^-24, exact in float32.
  const float magnitude = float(mantissa) * 0x1p-24f;
  return sign ? -magnitude : magnitude;
}

// Round to nearest, ties to even; overflow to inf; NaN stays a quiet NaN.
inline __half __float2half_rn(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return __half{uint16_t(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu))};
  if (magnitude >= 0x477FF000u) return __half{uint16_t(sign | 0x7C00u)};  // >= 65520: rounds to inf
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal step is 2^-24; let float arithmetic round.
    const float scaled = __uint_as_float(magnitude) * 0x1p24f;  // exact: a power-of-two scaling
    return __half{uint16_t(sign | uint16_t(std::nearbyint(scaled)))};  // nearest-even under the default mode
  }
  // Normal: drop 13 mantissa bits with round-to-nearest-even, re-bias the exponent (127 -> 15).
  const uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
  return __half{uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
}
