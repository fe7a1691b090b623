// cls_scores: the class token's head-averaged attention row from one read of x (docs/alast.md, "Scoring without projecting every key").
//
// The host folds everything token-independent into u (B, H, D) = scale · ln_weight ⊙ (W_kᵀ q_cls) per
// head; the LayerNorm bias and the key bias add the same logit to every token and cancel in the softmax.
// Kernel 1: one warp per token computes its LayerNorm statistics (two passes, float32) and the H logits
// rstd · Σ_d (x_d - mean) · u[h, d]. Kernel 2: one block per image takes the softmax over tokens of each
// head's logits and averages the H probability rows.
#include <cfloat>

#include "common.cuh"

namespace alast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

// Block-wide sum or max; every thread gets the result. `scratch` holds 32 floats.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();  // scratch is rewritten by the next call
  return r;
}

template <typename E>
__global__ void token_logits_kernel(const typename E::raw* __restrict__ x, const float* __restrict__ u,
                                    float* __restrict__ logits, int64_t B, int64_t N, int64_t D, int64_t H,
                                    float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const float inv_d = 1.0f / float(D);
  for (int64_t token = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); token < B * N;
       token += int64_t(gridDim.x) * warps) {
    const int64_t b = token / N, n = token - b * N;
    const typename E::raw* row = x + token * D;
    float sum = 0.0f;
    for (int64_t d = lane; d < D; d += 32) sum += E::load(row[d]);
    const float mean = warp_sum(sum) * inv_d;
    float squares = 0.0f;
    for (int64_t d = lane; d < D; d += 32) {
      const float centred = E::load(row[d]) - mean;
      squares += centred * centred;
    }
    const float rstd = rsqrtf(warp_sum(squares) * inv_d + eps);
    for (int64_t h = 0; h < H; ++h) {
      const float* uh = u + (b * H + h) * D;
      float dot = 0.0f;
      for (int64_t d = lane; d < D; d += 32) dot += (E::load(row[d]) - mean) * uh[d];  // row re-read from L1
      dot = warp_sum(dot);
      if (lane == 0) logits[(b * H + h) * N + n] = dot * rstd;
    }
  }
}

__global__ void head_softmax_mean_kernel(const float* __restrict__ logits, float* __restrict__ out, int64_t B,
                                         int64_t N, int64_t H) {
  __shared__ float scratch[32];
  const float inv_h = 1.0f / float(H);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    float* out_row = out + b * N;
    // Each thread only ever touches its own tokens n = threadIdx.x + k·blockDim.x of out_row.
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) out_row[n] = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const float* row = logits + (b * H + h) * N;
      float peak = -FLT_MAX;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) peak = fmaxf(peak, row[n]);
      peak = block_reduce<true>(peak, scratch);
      float total = 0.0f;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) total += expf(row[n] - peak);
      total = block_reduce<false>(total, scratch);
      const float weight = inv_h / total;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) out_row[n] += expf(row[n] - peak) * weight;
    }
  }
}

}  // namespace

cudaError_t launch_cls_scores(const void* x, const float* u, float* logits, float* out, Dtype dtype, int64_t B,
                              int64_t N, int64_t D, int64_t H, float eps, cudaStream_t stream) {
  if (B * N == 0) return cudaSuccess;
  const cudaError_t status = dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    ALAST_LAUNCH(grid_for(B * N, kThreads / 32), kThreads, 0, stream, token_logits_kernel<E>)(
        static_cast<const typename E::raw*>(x), u, logits, B, N, D, H, eps);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  ALAST_LAUNCH(grid_for(B, 1), kThreads, 0, stream, head_softmax_mean_kernel)(logits, out, B, N, H);
  return cudaGetLastError();
}

}  // namespace alast
