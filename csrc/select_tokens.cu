// select_tokens: per-row top-k of the non-prefix scores, returned in ascending index order.
//
// One thread block per row. Scores become order-preserving 32-bit keys (NaN highest, -0 == +0, as
// torch.sort orders them). A 4-pass radix select (8 bits a pass, 256-bin histograms in shared memory)
// finds the keep-th largest key T and how many keys equal to T are still needed; a last pass over the
// row in index order takes every key above T and the lowest-indexed keys equal to T, and compacts them
// with a block-wide scan of ballots, so the output comes out sorted without a sort.
// Rows of up to kMaxCachedTokens candidates keep their keys in shared memory; longer rows recompute the
// keys from global memory on every pass (same algorithm, no size limit).
#include "common.cuh"

namespace alast {
namespace {

constexpr int kMaxCachedTokens = 4096;
constexpr int kMaxThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

// Larger score -> larger key. NaN above +inf (torch.sort puts NaN first in descending order); both zeros
// map to the key of +0 so they tie, as they compare equal.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0xFFFFFFFFu;
  if (v == 0.0f) v = 0.0f;
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Exclusive prefix count of `flag` over the block in thread order, and the block total.
// Every thread of the block must call it (blockDim.x a multiple of 32); `warp_counts` holds 32 ints.
__device__ __forceinline__ void block_count_scan(bool flag, int* warp_counts, int& before, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  before = __popc(ballot & ((1u << lane) - 1u));
  total = 0;
  for (int w = 0; w < warps; ++w) {
    const int c = warp_counts[w];
    if (w < warp) before += c;
    total += c;
  }
  __syncthreads();  // warp_counts is rewritten by the next call
}

template <typename E, bool kCached>
__global__ void select_tokens_kernel(const typename E::raw* __restrict__ scores, int64_t rows, int n,
                                     int keep, int num_prefix, int64_t* __restrict__ out) {
  ALAST_DYNAMIC_SHARED(uint32_t, cached_keys);
  __shared__ int hist[kBins];
  __shared__ int warp_counts[32];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;

  const int m = n - num_prefix;  // candidates per row
  const int out_cols = num_prefix + keep;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const typename E::raw* candidates = scores + row * n + num_prefix;
    int64_t* out_row = out + row * out_cols;
    auto key_at = [&](int i) -> uint32_t {
      return kCached ? cached_keys[i] : order_key(E::load(candidates[i]));
    };

    if (kCached) {
      for (int i = threadIdx.x; i < m; i += blockDim.x) cached_keys[i] = order_key(E::load(candidates[i]));
    }
    for (int i = threadIdx.x; i < num_prefix; i += blockDim.x) out_row[i] = i;

    // Radix select from the top digit down: `prefix` holds the digits of T found so far (under `mask`),
    // `remaining` how many keys matching them are still to be taken.
    uint32_t prefix = 0, mask = 0;
    int remaining = keep;
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0;
      __syncthreads();  // also orders the key cache writes before the reads below
      for (int i = threadIdx.x; i < m; i += blockDim.x) {
        const uint32_t k = key_at(i);
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & (kBins - 1)], 1);
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        // Lane l sums bins 255-8l .. 248-8l (highest bins on lane 0); an inclusive scan over lanes gives
        // the count of keys in all higher bins, and one lane finds the bin where `remaining` is reached.
        const int lane = threadIdx.x;
        constexpr int kPerLane = kBins / 32;
        int local = 0;
        for (int j = 0; j < kPerLane; ++j) local += hist[kBins - 1 - lane * kPerLane - j];
        int inclusive = local;
        for (int offset = 1; offset < 32; offset <<= 1) {
          const int up = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
          if (lane >= offset) inclusive += up;
        }
        int above = inclusive - local;
        if (above < remaining && remaining <= inclusive) {
          for (int j = 0; j < kPerLane; ++j) {
            const int bin = kBins - 1 - lane * kPerLane - j;
            if (above + hist[bin] >= remaining) {
              s_prefix = prefix | (uint32_t(bin) << shift);
              s_remaining = remaining - above;
              break;
            }
            above += hist[bin];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= uint32_t(kBins - 1) << shift;
    }
    const uint32_t threshold = prefix;  // the keep-th largest key; take `remaining` keys equal to it

    // Compaction in index order: tiles of blockDim.x candidates, one per thread.
    int taken = 0, ties_seen = 0;
    for (int start = 0; start < m; start += blockDim.x) {
      const int i = start + threadIdx.x;
      const uint32_t k = i < m ? key_at(i) : 0u;
      const bool above = i < m && k > threshold;
      const bool tie = i < m && k == threshold;
      int tie_before, tie_total;
      block_count_scan(tie, warp_counts, tie_before, tie_total);
      const bool take = above || (tie && ties_seen + tie_before < remaining);
      int take_before, take_total;
      block_count_scan(take, warp_counts, take_before, take_total);
      if (take) out_row[num_prefix + taken + take_before] = int64_t(i) + num_prefix;
      taken += take_total;
      ties_seen += tie_total;
    }
    __syncthreads();  // the next row reuses the key cache and the histogram
  }
}

template <typename E>
cudaError_t launch(const void* scores, int64_t rows, int n, int keep, int num_prefix, int64_t* out,
                   cudaStream_t stream) {
  const int m = n - num_prefix;
  int threads = ((m + 31) / 32) * 32;
  threads = threads < 64 ? 64 : (threads > kMaxThreads ? kMaxThreads : threads);
  const unsigned grid = grid_for(rows, 1);
  const auto* s = static_cast<const typename E::raw*>(scores);
  if (m <= kMaxCachedTokens) {
    const size_t smem = size_t(m) * sizeof(uint32_t);
    ALAST_LAUNCH(grid, threads, smem, stream, select_tokens_kernel<E, true>)(s, rows, n, keep, num_prefix, out);
  } else {
    ALAST_LAUNCH(grid, threads, 0, stream, select_tokens_kernel<E, false>)(s, rows, n, keep, num_prefix, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_select_tokens(const void* scores, Dtype dtype, int64_t rows, int64_t n, int64_t keep,
                                 int64_t num_prefix, int64_t* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch<decltype(tag)>(scores, rows, int(n), int(keep), int(num_prefix), out, stream);
  });
}

}  // namespace alast
