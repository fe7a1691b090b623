// Small kernels that test the CUDA emulation itself (tests/test_cuda_emulation.py): correct ones whose
// results follow from the CUDA semantics, and deliberately broken ones the emulation must stop.
//
// Built as host C++ against csrc/emulation/simt.h with the emulation runtime; one C entry point,
// run_case(name, out, n, message, size), launches the named case and returns the launch status with the
// emulator's message.
#include <cstring>
#include <string>

#include "common.cuh"  // the kernels' own header: simt.h and ALAST_DEVICE_CHECK in the emulation build

namespace {

// --------------------------------------------------------------------------------------------- correct
// Each thread: its flat id, the block id and the block's thread count, as the kernel sees them.
__global__ void coordinates(int* out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * blockIdx.y;
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  out[3 * (b * threads + t) + 0] = t;
  out[3 * (b * threads + t) + 1] = b;
  out[3 * (b * threads + t) + 2] = threads;
}

// A block-wide inclusive prefix sum of threadIdx.x: shuffles inside warps, one barrier-separated pass
// over the warp totals in shared memory, then a second barrier before the shared memory is reused.
__global__ void block_scan(int* out) {
  __shared__ int warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int v = int(threadIdx.x);
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(0xFFFFFFFFu, v, offset);
    if (lane >= offset) v += up;
  }
  if (lane == 31) warp_totals[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp; ++w) v += warp_totals[w];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Ballot of odd lanes, butterfly sum over the warp, shared-memory atomics, dynamic shared memory.
__global__ void warp_ops(int* out) {
  ALAST_DYNAMIC_SHARED(int, counts);
  if (threadIdx.x < 4) counts[threadIdx.x] = 0;
  __syncthreads();
  const unsigned odd = __ballot_sync(0xFFFFFFFFu, threadIdx.x & 1);
  float sum = float(threadIdx.x & 31);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
  atomicAdd(&counts[threadIdx.x % 4], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    out[0] = int(odd == 0xAAAAAAAAu);
    out[1] = __popc(odd);
    out[2] = int(sum);  // 0 + 1 + ... + 31 in every lane
    for (int i = 0; i < 4; ++i) out[3 + i] = counts[i];
  }
}

// --------------------------------------------------------------------------------------------- broken
// One past the end of the dynamic shared memory the launch gave (a size computed one short).
__global__ void dynamic_shared_overflow(int* out) {
  ALAST_DYNAMIC_SHARED(int, cache);
  cache[threadIdx.x] = int(threadIdx.x);  // blockDim.x elements, the launch gave blockDim.x - 1
  out[threadIdx.x] = 1;
}

// A static __shared__ array indexed by thread id with more threads than elements.
__global__ void static_shared_overflow(int* out) {
  __shared__ int slots[32];
  slots[threadIdx.x] = 1;  // 64 threads
  out[threadIdx.x] = 1;
}

// Half the block returns early, the other half waits at a barrier: undefined on a GPU (it may hang).
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lanes 16-31 have returned, the others shuffle with a full mask that still names them.
__global__ void shuffle_with_exited_lanes(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 1);
}

// Every lane calls a ballot whose mask names lane 0 only.
__global__ void lane_outside_its_mask(int* out) { out[threadIdx.x] = int(__ballot_sync(0x1u, 1)); }

// A device-side check (the kernels' own macro) that fails in one thread.
__global__ void failed_device_check(int* out) {
  ALAST_DEVICE_CHECK(threadIdx.x != 5, "thread %u is not allowed\n", threadIdx.x);
  out[threadIdx.x] = 1;
}

cudaError_t run(const std::string& name, int* out, int n) {
  (void)n;
  cudaStream_t stream = nullptr;
  if (name == "coordinates") ALAST_LAUNCH(dim3(2, 3), dim3(4, 2, 2), 0, stream, coordinates)(out);
  else if (name == "block_scan") ALAST_LAUNCH(2, 256, 0, stream, block_scan)(out);
  else if (name == "warp_ops") ALAST_LAUNCH(1, 64, 4 * sizeof(int), stream, warp_ops)(out);
  else if (name == "dynamic_shared_overflow")
    ALAST_LAUNCH(1, 64, 63 * sizeof(int), stream, dynamic_shared_overflow)(out);
  else if (name == "static_shared_overflow") ALAST_LAUNCH(1, 64, 0, stream, static_shared_overflow)(out);
  else if (name == "divergent_barrier") ALAST_LAUNCH(1, 32, 0, stream, divergent_barrier)(out);
  else if (name == "shuffle_with_exited_lanes") ALAST_LAUNCH(1, 32, 0, stream, shuffle_with_exited_lanes)(out);
  else if (name == "lane_outside_its_mask") ALAST_LAUNCH(1, 32, 0, stream, lane_outside_its_mask)(out);
  else if (name == "failed_device_check") ALAST_LAUNCH(1, 32, 0, stream, failed_device_check)(out);
  // Launch configurations a GPU refuses.
  else if (name == "too_many_threads") ALAST_LAUNCH(1, 1025, 0, stream, coordinates)(out);
  else if (name == "empty_grid") ALAST_LAUNCH(0, 32, 0, stream, coordinates)(out);
  else if (name == "too_much_dynamic_shared") ALAST_LAUNCH(1, 64, 48 * 1024 + 4, stream, warp_ops)(out);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int run_case(const char* name, int* out, int n, char* message,
                                                             int size) {
  const cudaError_t status = run(name, out, n);
  std::strncpy(message, status == cudaSuccess ? "" : cudaGetErrorString(status), size_t(size) - 1);
  message[size - 1] = '\0';
  return int(status);
}
