// Backward of token log-probs (and entropy) with respect to the logits: one read of each logit and one write of
// each gradient, in place when grad_logits is the logits buffer. See rlvrw_kernels.h. CUDA runtime only, no torch.
#include "logits_common.cuh"

namespace rlvrw {
namespace detail {

// No __restrict__ on logits / grad: they are the same buffer in the in-place use. Every element is read and then
// written by the same thread, so aliasing is safe.
template <typename T, int THREADS, int BLOCK, bool kEntropy>
__global__ void __launch_bounds__(BLOCK)
    logits_backward_kernel(const T* logits, RowLayout layout, T* grad, RowLayout grad_layout, int64_t n_rows,
                           int vocab, const int64_t* __restrict__ tokens, float inv_t, const float* __restrict__ lse,
                           const float* __restrict__ grad_logp, const float* __restrict__ entropy,
                           const float* __restrict__ grad_entropy) {
  static_assert(THREADS % kWarpSize == 0 && BLOCK % THREADS == 0, "bad launch shape");
  constexpr int ROWS = BLOCK / THREADS;

  const int slot = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + slot; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * ROWS) {
    const T* x = logits + row_start(row, layout);
    T* gx = grad + row_start(row, grad_layout);

    const float g = grad_logp != nullptr ? grad_logp[row] : 0.f;
    const float ge = kEntropy ? grad_entropy[row] : 0.f;
    const float h = kEntropy ? entropy[row] : 0.f;
    const int64_t tok = tokens != nullptr ? tokens[row] : -1;
    backward_row<T, THREADS, kEntropy>(x, gx, vocab, tok, inv_t, lse[row], g, ge, h, lane);
  }
}

struct BackwardArgs {
  const void* logits;
  RowLayout layout;
  void* grad;
  RowLayout grad_layout;
  int64_t n_rows;
  int vocab;
  const int64_t* tokens;
  float inv_t;
  const float* lse;
  const float* grad_logp;
  const float* entropy;
  const float* grad_entropy;
};

template <typename T, int THREADS, int BLOCK, bool kEntropy>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  const unsigned grid = grid_for(a.n_rows, BLOCK / THREADS);
  logits_backward_kernel<T, THREADS, BLOCK, kEntropy><<<grid, BLOCK, 0, stream>>>(
      static_cast<const T*>(a.logits), a.layout, static_cast<T*>(a.grad), a.grad_layout, a.n_rows, a.vocab,
      a.tokens, a.inv_t, a.lse, a.grad_logp, a.entropy, a.grad_entropy);
  return cudaGetLastError();
}

template <typename T, bool kEntropy>
cudaError_t dispatch_backward_shape(const BackwardArgs& a, cudaStream_t stream) {
  switch (choose_shape(a.vocab)) {
    case Shape::kWarpPerRow:
      return launch_backward<T, 32, 256, kEntropy>(a, stream);
    case Shape::kBlock256:
      return launch_backward<T, 256, 256, kEntropy>(a, stream);
    default:
      return launch_backward<T, 512, 512, kEntropy>(a, stream);
  }
}

template <typename T>
cudaError_t dispatch_backward(const BackwardArgs& a, cudaStream_t stream) {
  if (a.grad_entropy != nullptr) return dispatch_backward_shape<T, true>(a, stream);
  return dispatch_backward_shape<T, false>(a, stream);
}

}  // namespace detail
}  // namespace rlvrw

extern "C" cudaError_t rlvrw_logits_backward_strided(const void* logits, int64_t rows_per_seq, int64_t seq_stride,
                                                     int64_t row_stride, void* grad_logits, int64_t grad_seq_stride,
                                                     int64_t grad_row_stride, int dtype, int64_t n_rows,
                                                     int64_t vocab, const int64_t* tokens, float inv_temperature,
                                                     const float* lse, const float* grad_logp, const float* entropy,
                                                     const float* grad_entropy, cudaStream_t stream) {
  using namespace rlvrw::detail;
  if (n_rows < 0 || vocab < 0 || vocab > INT_MAX || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n_rows == 0 || vocab == 0) return cudaSuccess;
  if (!valid_layout(n_rows, vocab, rows_per_seq, seq_stride, row_stride) ||
      !valid_layout(n_rows, vocab, rows_per_seq, grad_seq_stride, grad_row_stride)) {
    return cudaErrorInvalidValue;
  }
  if (logits == nullptr || grad_logits == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  if (grad_entropy != nullptr && entropy == nullptr) return cudaErrorInvalidValue;
  if (logits == grad_logits && (row_stride != grad_row_stride || seq_stride != grad_seq_stride)) {
    return cudaErrorInvalidValue;
  }
  BackwardArgs a{logits,
                 RowLayout{rows_per_seq, seq_stride, row_stride},
                 grad_logits,
                 RowLayout{rows_per_seq, grad_seq_stride, grad_row_stride},
                 n_rows,
                 static_cast<int>(vocab),
                 tokens,
                 inv_temperature,
                 lse,
                 grad_logp,
                 entropy,
                 grad_entropy};
  switch (dtype) {
    case RLVRW_DTYPE_FLOAT32:
      return dispatch_backward<float>(a, stream);
    case RLVRW_DTYPE_BFLOAT16:
      return dispatch_backward<__nv_bfloat16>(a, stream);
    default:
      return dispatch_backward<__half>(a, stream);
  }
}

extern "C" cudaError_t rlvrw_logits_backward(const void* logits, void* grad_logits, int dtype, int64_t n_rows,
                                             int64_t vocab, int64_t rows_per_seq, int64_t seq_stride,
                                             int64_t row_stride, const int64_t* tokens, float inv_temperature,
                                             const float* lse, const float* grad_logp, const float* entropy,
                                             const float* grad_entropy, cudaStream_t stream) {
  return rlvrw_logits_backward_strided(logits, rows_per_seq, seq_stride, row_stride, grad_logits, seq_stride,
                                       row_stride, dtype, n_rows, vocab, tokens, inv_temperature, lse, grad_logp,
                                       entropy, grad_entropy, stream);
}
