// gather_tokens / scatter_tokens and their backward passes: row copies along the token dimension.
//
// gather copies whole token rows as raw bytes, 16 bytes per load/store when the row size and both base
// pointers allow it (then 8, 4, 2, 1). The scatter direction never uses atomics: an index-inverse linked
// list (head[b, n] -> j -> next[b, j] -> ...) is built first, then every output row is written exactly
// once by one pass that sums its sources in float32 — coalesced writes, and a repeated index (allowed for
// the gather backward) simply has a longer list.
#include <initializer_list>

#include "common.cuh"

namespace alast {
namespace {

constexpr int kThreads = 256;

// Threads per row for `vectors` vectors a row: a multiple of 32, at most kThreads; the rest of the block
// (blockDim.y) takes further rows.
inline dim3 row_block(int64_t vectors) {
  int64_t x = ((vectors + 31) / 32) * 32;
  x = x < 32 ? 32 : (x > kThreads ? kThreads : x);
  return dim3(unsigned(x), unsigned(kThreads / x));
}

template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ idx, V* __restrict__ out,
                                   int64_t B, int64_t N, int64_t K, int64_t vectors) {
  const int64_t rows = B * K;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / K;
    const int64_t src = idx[row];
    const bool in_range = src >= 0 && src < N;
    ALAST_DEVICE_CHECK(in_range, "gather_tokens: idx[%lld, %lld] = %lld is outside [0, %lld)\n",
                       (long long)b, (long long)(row - b * K), (long long)src, (long long)N);
    if (!in_range) continue;
    const V* from = x + (b * N + src) * vectors;
    V* to = out + row * vectors;
    for (int64_t c = threadIdx.x; c < vectors; c += blockDim.x) to[c] = from[c];
  }
}

template <typename V>
cudaError_t launch_gather(const void* x, const int64_t* idx, void* out, int64_t B, int64_t N, int64_t K,
                          int64_t row_bytes, cudaStream_t stream) {
  const int64_t vectors = row_bytes / int64_t(sizeof(V));
  const dim3 block = row_block(vectors);
  ALAST_LAUNCH(grid_for(B * K, block.y), block, 0, stream, gather_rows_kernel<V>)(
      static_cast<const V*>(x), idx, static_cast<V*>(out), B, N, K, vectors);
  return cudaGetLastError();
}

__global__ void index_links_kernel(const int64_t* __restrict__ idx, int64_t B, int64_t N, int64_t K, bool unique,
                                   int32_t* __restrict__ head, int32_t* __restrict__ next) {
  const int64_t total = B * K;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / K, j = t - b * K;
    const int64_t n = idx[t];
    const bool in_range = n >= 0 && n < N;
    ALAST_DEVICE_CHECK(in_range, "idx[%lld, %lld] = %lld is outside [0, %lld)\n", (long long)b, (long long)j,
                       (long long)n, (long long)N);
    if (!in_range) {
      next[t] = -1;
      continue;
    }
    const int32_t previous = atomicExch(&head[b * N + n], int32_t(j));
    ALAST_DEVICE_CHECK(!unique || previous < 0, "scatter_tokens: index %lld repeats in row %lld of idx\n",
                       (long long)n, (long long)b);
    next[t] = previous;
  }
}

// One output row per blockDim.y slot; each thread owns VEC consecutive elements (16 bytes when aligned).
template <typename E, int VEC>
__global__ void scatter_rows_kernel(const typename E::raw* __restrict__ base, const typename E::raw* __restrict__ src,
                                    const int32_t* __restrict__ head, const int32_t* __restrict__ next,
                                    typename E::raw* __restrict__ out, int64_t B, int64_t N, int64_t K,
                                    int64_t D) {
  using raw = typename E::raw;
  struct alignas(sizeof(raw) * VEC) Pack { raw v[VEC]; };
  const int64_t rows = B * N, packs = D / VEC;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t b = row / N;
    const int32_t first = head[row];
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      float acc[VEC];
      if (base != nullptr) {
        const Pack p = reinterpret_cast<const Pack*>(base + row * D)[c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = E::load(p.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
      }
      for (int32_t j = first; j >= 0; j = next[b * K + j]) {
        const Pack p = reinterpret_cast<const Pack*>(src + (b * K + j) * D)[c];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += E::load(p.v[e]);
      }
      Pack o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = E::store(acc[e]);
      reinterpret_cast<Pack*>(out + row * D)[c] = o;
    }
  }
}

template <typename E, int VEC>
cudaError_t launch_scatter(const void* base, const void* src, const int32_t* head, const int32_t* next, void* out,
                           int64_t B, int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  using raw = typename E::raw;
  const dim3 block = row_block(D / VEC);
  ALAST_LAUNCH(grid_for(B * N, block.y), block, 0, stream, scatter_rows_kernel<E, VEC>)(
      static_cast<const raw*>(base), static_cast<const raw*>(src), head, next, static_cast<raw*>(out), B, N, K, D);
  return cudaGetLastError();
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

cudaError_t launch_gather_rows(const void* x, const int64_t* idx, void* out, int64_t B, int64_t N, int64_t K,
                               int64_t row_bytes, cudaStream_t stream) {
  if (B * K == 0 || row_bytes == 0) return cudaSuccess;
  // The widest unit that divides the row and both base pointers' alignment.
  for (int64_t unit : {16, 8, 4, 2}) {
    if (row_bytes % unit == 0 && aligned(x, unit) && aligned(out, unit)) {
      switch (unit) {
        case 16: return launch_gather<uint4>(x, idx, out, B, N, K, row_bytes, stream);
        case 8: return launch_gather<uint2>(x, idx, out, B, N, K, row_bytes, stream);
        case 4: return launch_gather<uint32_t>(x, idx, out, B, N, K, row_bytes, stream);
        default: return launch_gather<uint16_t>(x, idx, out, B, N, K, row_bytes, stream);
      }
    }
  }
  return launch_gather<uint8_t>(x, idx, out, B, N, K, row_bytes, stream);
}

cudaError_t launch_index_links(const int64_t* idx, int64_t B, int64_t N, int64_t K, bool unique, int32_t* head,
                               int32_t* next, cudaStream_t stream) {
  if (B * N > 0) {
    // All bits set: -1 in every int32, the empty list.
    const cudaError_t status = cudaMemsetAsync(head, 0xFF, size_t(B * N) * sizeof(int32_t), stream);
    if (status != cudaSuccess) return status;
  }
  if (B * K == 0) return cudaSuccess;
  ALAST_LAUNCH(grid_for(B * K, kThreads), kThreads, 0, stream, index_links_kernel)(idx, B, N, K, unique, head, next);
  return cudaGetLastError();
}

cudaError_t launch_scatter_rows(const void* base, const void* src, const int32_t* head, const int32_t* next,
                                void* out, Dtype dtype, int64_t B, int64_t N, int64_t K, int64_t D,
                                cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    constexpr int kVec = 16 / int(sizeof(typename E::raw));
    const int64_t bytes = int64_t(sizeof(typename E::raw)) * kVec;
    const bool vector_ok = D % kVec == 0 && aligned(src, bytes) && aligned(out, bytes) &&
                           (base == nullptr || aligned(base, bytes));
    if (vector_ok) return launch_scatter<E, kVec>(base, src, head, next, out, B, N, K, D, stream);
    return launch_scatter<E, 1>(base, src, head, next, out, B, N, K, D, stream);
  });
}

}  // namespace alast
