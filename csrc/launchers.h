// Raw launchers of the CUDA kernels: plain pointers and sizes, no ATen, so the .cu files compile with
// the CUDA headers alone. Arguments are checked by the op wrappers in ops.cpp before these run; each
// launcher enqueues on `stream` and returns the launch status (cudaSuccess when nothing was launched).
#pragma once

#include <cstdint>

#ifdef ALAST_EMULATION
#include "emulation/simt.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace alast {

// Element types of the floating tensors the kernels read and write.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// scores: (rows, n) row-major. out: int64 (rows, num_prefix + keep): 0..num_prefix-1, then the `keep`
// highest-scoring of columns num_prefix..n-1 in ascending order (ties to the lower index, NaN highest).
cudaError_t launch_select_tokens(const void* scores, Dtype dtype, int64_t rows, int64_t n, int64_t keep,
                                 int64_t num_prefix, int64_t* out, cudaStream_t stream);

// out[b, j, :] = x[b, idx[b, j], :] for x (B, N, row_bytes) viewed as bytes; idx int64 (B, K).
cudaError_t launch_gather_rows(const void* x, const int64_t* idx, void* out, int64_t B, int64_t N, int64_t K,
                               int64_t row_bytes, cudaStream_t stream);

// Inverse of idx (B, K): head[b, n] = some j with idx[b, j] == n (-1 for none) and next[b, j] = the next
// such j (-1 at the end of the list). With `unique`, a repeated index is a device-side assertion.
cudaError_t launch_index_links(const int64_t* idx, int64_t B, int64_t N, int64_t K, bool unique,
                               int32_t* head, int32_t* next, cudaStream_t stream);

// out[b, n, :] = base[b, n, :] (zeros when base is null) + sum of src[b, j, :] over the j that
// head/next list for token n, accumulated in float32. base, out: (B, N, D); src: (B, K, D).
cudaError_t launch_scatter_rows(const void* base, const void* src, const int32_t* head, const int32_t* next,
                                void* out, Dtype dtype, int64_t B, int64_t N, int64_t K, int64_t D,
                                cudaStream_t stream);

// out[b, n] = mean over h of softmax over n of  layer_norm(x[b, n]) · u[b, h]  (no affine: the caller
// folds the LayerNorm weight and the logit scale into u, and the bias term cancels in the softmax).
// x: (B, N, D); u: float32 (B, H, D); logits: float32 (B, H, N) workspace; out: float32 (B, N).
cudaError_t launch_cls_scores(const void* x, const float* u, float* logits, float* out, Dtype dtype,
                              int64_t B, int64_t N, int64_t D, int64_t H, float eps, cudaStream_t stream);

}  // namespace alast
