// Forward of token log-probs / log-sum-exp / entropy over a (n_rows, vocab) logits matrix: one read of each logit.
// See rlvrw_kernels.h for the math and the conventions. CUDA runtime only, no torch.
#include "logits_common.cuh"

namespace rlvrw {
namespace detail {

// THREADS threads per row, BLOCK threads per block (BLOCK / THREADS rows per block, or one row when equal).
// kEntropy: also accumulate sum exp(z - m) (z - m) and write entropy (entropy != nullptr).
template <typename T, int THREADS, int BLOCK, bool kEntropy>
__global__ void __launch_bounds__(BLOCK)
    logits_forward_kernel(const T* __restrict__ logits, int64_t n_rows, int vocab, RowLayout layout,
                          const int64_t* __restrict__ tokens, float inv_t, float* __restrict__ logp,
                          float* __restrict__ lse, float* __restrict__ entropy) {
  static_assert(THREADS % kWarpSize == 0 && BLOCK % THREADS == 0, "bad launch shape");
  constexpr int ROWS = BLOCK / THREADS;
  constexpr int NWARPS = THREADS / kWarpSize;
  static_assert(ROWS == 1 || THREADS == kWarpSize, "a row is one warp or one whole block");

  const int slot = threadIdx.x / THREADS;  // which row of the block
  const int lane = threadIdx.x % THREADS;  // thread index within the row's group

  __shared__ float red_m[NWARPS], red_s[NWARPS], red_t[NWARPS];

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + slot; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * ROWS) {
    const T* x = logits + row_start(row, layout);

    // The target logit: issued first so its latency hides behind the row scan.
    float x_tok = -INFINITY;
    bool has_tok = false;
    if (lane == 0 && tokens != nullptr) {
      const int64_t tok = tokens[row];
      has_tok = tok >= 0 && tok < vocab;
      if (has_tok) x_tok = to_float(x[tok]);
    }

    Online st = forward_row_partial<T, THREADS, kEntropy>(x, vocab, inv_t, lane);
    st = warp_reduce(st);
    if constexpr (NWARPS > 1) {
      const int warp = lane / kWarpSize;
      const int wl = lane % kWarpSize;
      if (wl == 0) {
        red_m[warp] = st.m;
        red_s[warp] = st.s;
        red_t[warp] = st.t;
      }
      __syncthreads();
      if (warp == 0) {
        st = (wl < NWARPS) ? Online{red_m[wl], red_s[wl], red_t[wl]} : online_identity();
        st = warp_reduce(st);
      }
      __syncthreads();  // red_* is rewritten by the next row
    }

    if (lane == 0) {
      const RowOut r = forward_row_finish(st, has_tok, x_tok, inv_t);
      lse[row] = r.lse;
      logp[row] = r.logp;
      if (kEntropy) entropy[row] = r.entropy;
    }
  }
}

template <typename T, int THREADS, int BLOCK>
cudaError_t launch_forward(const void* logits, int64_t n_rows, int vocab, const RowLayout& layout,
                           const int64_t* tokens, float inv_t, float* logp, float* lse, float* entropy,
                           cudaStream_t stream) {
  const unsigned grid = grid_for(n_rows, BLOCK / THREADS);
  const T* x = static_cast<const T*>(logits);
  if (entropy != nullptr) {
    logits_forward_kernel<T, THREADS, BLOCK, true>
        <<<grid, BLOCK, 0, stream>>>(x, n_rows, vocab, layout, tokens, inv_t, logp, lse, entropy);
  } else {
    logits_forward_kernel<T, THREADS, BLOCK, false>
        <<<grid, BLOCK, 0, stream>>>(x, n_rows, vocab, layout, tokens, inv_t, logp, lse, nullptr);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_forward(const void* logits, int64_t n_rows, int vocab, const RowLayout& layout,
                             const int64_t* tokens, float inv_t, float* logp, float* lse, float* entropy,
                             cudaStream_t stream) {
  switch (choose_shape(vocab)) {
    case Shape::kWarpPerRow:
      return launch_forward<T, 32, 256>(logits, n_rows, vocab, layout, tokens, inv_t, logp, lse, entropy, stream);
    case Shape::kBlock256:
      return launch_forward<T, 256, 256>(logits, n_rows, vocab, layout, tokens, inv_t, logp, lse, entropy, stream);
    default:
      return launch_forward<T, 512, 512>(logits, n_rows, vocab, layout, tokens, inv_t, logp, lse, entropy, stream);
  }
}

}  // namespace detail
}  // namespace rlvrw

extern "C" cudaError_t rlvrw_logits_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                                            int64_t rows_per_seq, int64_t seq_stride, int64_t row_stride,
                                            const int64_t* tokens, float inv_temperature, float* logp, float* lse,
                                            float* entropy, cudaStream_t stream) {
  using namespace rlvrw::detail;
  if (n_rows < 0 || vocab < 0 || vocab > INT_MAX || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  if (!valid_layout(n_rows, vocab, rows_per_seq, seq_stride, row_stride)) return cudaErrorInvalidValue;
  if ((logits == nullptr && vocab > 0) || logp == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  const int v = static_cast<int>(vocab);
  const RowLayout layout{rows_per_seq, seq_stride, row_stride};
  switch (dtype) {
    case RLVRW_DTYPE_FLOAT32:
      return dispatch_forward<float>(logits, n_rows, v, layout, tokens, inv_temperature, logp, lse, entropy, stream);
    case RLVRW_DTYPE_BFLOAT16:
      return dispatch_forward<__nv_bfloat16>(logits, n_rows, v, layout, tokens, inv_temperature, logp, lse, entropy,
                                             stream);
    default:
      return dispatch_forward<__half>(logits, n_rows, v, layout, tokens, inv_temperature, logp, lse, entropy,
                                      stream);
  }
}
