// Device helpers shared by the kernels: element conversion, the device-side index check, launch sizes.
#pragma once

#include <cstdint>
#include <cstdio>

#ifdef ALAST_EMULATION
// The same kernels compiled as host C++: csrc/emulation/simt.h provides the CUDA execution model.
#include "emulation/simt.h"
#else
// Device-side index checks stay on in release builds (see ALAST_DEVICE_CHECK).
#undef NDEBUG
#include <assert.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, shared, stream>>>(args...), written so that the emulation build can run it on the host.
#define ALAST_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
// The block's dynamic shared memory as an array of `type` (bounds-checked in the emulation build).
#define ALAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include "launchers.h"

namespace alast {

// Element tags: storage type and conversion to and from float32 (the accumulation type).
struct F32 {
  using raw = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// bfloat16 by bit manipulation: the upper half of a float32, rounded to nearest even.
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  static __device__ __forceinline__ uint16_t store(float v) {
    uint32_t bits = __float_as_uint(v);
    if (v != v) return uint16_t((bits >> 16) | 0x40u);  // keep NaN a (quiet) NaN
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
  }
};

// Calls `fn(Tag{})` with the element tag of `dtype`.
template <typename Fn>
inline cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(F32{});
    case Dtype::kFloat16: return fn(F16{});
    case Dtype::kBFloat16: return fn(BF16{});
  }
  return cudaErrorInvalidValue;
}

// A bad index found on the device (the host did not read the indices): print it and fail a device-side
// assertion, as PyTorch's own index kernels do (the CUDA context is unusable afterwards). Callers skip the
// access too, so nothing is read or written out of bounds even where assertions are compiled out.
// The emulation build stops the launch with the message instead (the op then raises it).
#ifdef ALAST_EMULATION
#define ALAST_DEVICE_CHECK(cond, ...)                                                                \
  do {                                                                                               \
    if (!(cond)) ::alast::emu::device_assert(#cond, __FILE__, __LINE__, "alast_kernels: " __VA_ARGS__); \
  } while (0)
#else
#define ALAST_DEVICE_CHECK(cond, ...)                                                  \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      printf("alast_kernels: " __VA_ARGS__);                                           \
      assert(cond);                                                                    \
    }                                                                                  \
  } while (0)
#endif

// Grid size for grid-stride loops over `work` items of `per_block` each.
inline unsigned int grid_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  const int64_t cap = int64_t(1) << 20;  // grid-stride loops cover the rest
  return unsigned(blocks < cap ? blocks : cap);
}

}  // namespace alast
