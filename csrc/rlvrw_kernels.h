// rlvrw CUDA kernels: the torch-free C API.
//
// Everything declared here is implemented in csrc/*.cu with the CUDA runtime only (no torch headers), so CI can
// compile the kernels with plain `nvcc -arch=sm_90 -c`. The torch glue that checks tensors and registers the ops
// lives in csrc/ops.cpp and is built only against a CUDA build of torch.
//
// Token log-probabilities, log-sum-exp and entropy of a temperature-scaled softmax, and their backward.
// All math is fp32 whatever the logits dtype. For row n (0 <= n < n_rows) and column j (0 <= j < vocab):
//
//   z_j       = logits[start_n + j] * inv_temperature
//   lse_n     = log(sum_j exp(z_j))
//   logp_n    = z_{tok_n} - lse_n
//   entropy_n = lse_n - sum_j p_j z_j,          p_j = exp(z_j - lse_n)
//
//   grad_logits[n, j] = inv_temperature * ( grad_logp[n] * ([j == tok_n] - p_j)
//                                          - grad_entropy[n] * p_j * (z_j - lse_n + entropy_n) )
//
// Conventions:
//   * logits: rows of `vocab` contiguous elements laid out as a (B, T) grid of rows, so that the [:, :-1] slice of a
//     (B, T + 1, V) tensor is read in place: row n starts at element
//         start_n = (n / rows_per_seq) * seq_stride + (n % rows_per_seq) * row_stride
//     (strides in elements, not bytes; a plain (N, V) matrix is rows_per_seq = N, seq_stride = 0). rows_per_seq >= 1,
//     strides >= 0, and row_stride >= vocab when a sequence has two rows. Any alignment works; rows whose start is
//     16-byte aligned (or reaches a 16-byte boundary after a short scalar head) are read with 16-byte vector loads.
//   * dtype: RLVRW_DTYPE_FLOAT32 (0), RLVRW_DTYPE_BFLOAT16 (1) or RLVRW_DTYPE_FLOAT16 (2).
//   * tokens: int64, one per row. A token outside [0, vocab) is "no token": nothing is read for it, logp = -inf,
//     and the backward has no one-hot term (its gradient is -grad_logp * p: callers pass grad_logp = 0 for rows
//     they ignore). tokens may be NULL (every row has no token). Range checks belong to the caller.
//   * A row whose values are all -inf (or vocab == 0) gives lse = -inf, logp = -inf, entropy = 0 (no NaN); its
//     backward treats p_j as 0. NaN logits propagate to NaN outputs; +inf logits give NaN (as torch does).
//   * Backward: a row whose grad_logp and grad_entropy are both 0 (a masked position) gets a gradient of exactly 0
//     and is not read, whatever its logits hold (NaN, inf).
//   * Outputs are float32 arrays of n_rows elements. Everything is enqueued on `stream`; nothing synchronizes.
//   * Return value: cudaSuccess, cudaErrorInvalidValue for bad arguments (negative sizes, a bad row layout, unknown
//     dtype, a NULL required pointer), or the launch error from cudaGetLastError().
#pragma once

#include <stdint.h>
#include <cuda_runtime_api.h>

#define RLVRW_DTYPE_FLOAT32 0
#define RLVRW_DTYPE_BFLOAT16 1
#define RLVRW_DTYPE_FLOAT16 2

#ifdef __cplusplus
extern "C" {
#endif

// Forward. Writes logp[n], lse[n] and, when `entropy` is not NULL, entropy[n].
// One pass over the logits (online softmax that also carries sum exp(z - m) * (z - m) for the entropy).
cudaError_t rlvrw_logits_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t rows_per_seq,
                                 int64_t seq_stride, int64_t row_stride, const int64_t* tokens, float inv_temperature,
                                 float* logp, float* lse, float* entropy /* nullable */, cudaStream_t stream);

// Backward. Reads every logit once and writes every gradient once. grad_logits has the logits dtype and the same
// row layout; it may be the logits buffer itself (in place, the main use). lse comes from the forward.
// grad_logp may be NULL (treated as zeros). grad_entropy may be NULL (no entropy term); when it is not NULL,
// entropy (from the forward) must not be NULL.
cudaError_t rlvrw_logits_backward(const void* logits, void* grad_logits /* may alias logits */, int dtype,
                                  int64_t n_rows, int64_t vocab, int64_t rows_per_seq, int64_t seq_stride,
                                  int64_t row_stride, const int64_t* tokens, float inv_temperature, const float* lse,
                                  const float* grad_logp, const float* entropy /* nullable */,
                                  const float* grad_entropy /* nullable */, cudaStream_t stream);

// The same backward with its own strides for grad_logits (out of place into a buffer laid out differently; the
// same rows_per_seq). grad_logits must either be exactly logits (same pointer and strides) or not overlap it.
cudaError_t rlvrw_logits_backward_strided(const void* logits, int64_t rows_per_seq, int64_t seq_stride,
                                          int64_t row_stride, void* grad_logits, int64_t grad_seq_stride,
                                          int64_t grad_row_stride, int dtype, int64_t n_rows, int64_t vocab,
                                          const int64_t* tokens, float inv_temperature, const float* lse,
                                          const float* grad_logp, const float* entropy, const float* grad_entropy,
                                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Finite scalar quantization (csrc/fsq.cu; spec: rlvrw/reference/fsq.py). Math in fp32; dtype as above.
//
//   * A tensor of rows is a (n_batch, n_per_batch, d) view given by three element strides {batch, row, dim}: row r
//     is (r / n_per_batch, r % n_per_batch). Any strides work (0 included for gradients), 1 <= d <= 31.
//   * consts: device float array (4, d), rows half_l, offset, shift, half_width (= L // 2); ints: device int32
//     array (2, d), rows levels, basis. The caller computes them (rlvrw.ops.fsq.kernel_constants), so every backend
//     rounds at the same points.
//   * indices: int32, n_batch * n_per_batch of them, contiguous. A row outside the domain (NaN z, a code whose level
//     falls outside [0, L)) gets index -1; an index outside [0, codebook_size) decodes to NaN codes and gathers the
//     table's row codebook_size (the caller's NaN row).
//   * Return value as above; nothing synchronizes.

// codes = round(tanh(z + shift) * half_l - offset) / half_width (round half to even) and the row's index, one pass.
cudaError_t rlvrw_fsq_quantize(const void* z, int dtype, int64_t n_batch, int64_t n_per_batch, int d,
                               const int64_t* z_strides, void* codes, const int64_t* codes_strides, int32_t* indices,
                               const float* consts, const int32_t* ints, cudaStream_t stream);

// Straight-through backward: grad_z = grad_codes / half_width * half_l * (1 - tanh(z + shift)^2), all in `dtype`.
cudaError_t rlvrw_fsq_quantize_backward(const void* z, int dtype, int64_t n_batch, int64_t n_per_batch, int d,
                                        const int64_t* z_strides, const void* grad_codes, const int64_t* grad_strides,
                                        void* grad_z, const int64_t* grad_z_strides, const float* consts,
                                        cudaStream_t stream);

// index of each row of codes, each code snapped to its nearest level: round(code * half_width + half_width).
cudaError_t rlvrw_fsq_codes_to_indices(const void* codes, int dtype, int64_t n_batch, int64_t n_per_batch, int d,
                                       const int64_t* codes_strides, int32_t* indices, const float* consts,
                                       const int32_t* ints, cudaStream_t stream);

// codes (n, d), contiguous, in `dtype` from n indices (int64 when indices_int64, else int32; `index_stride`
// elements apart).
cudaError_t rlvrw_fsq_indices_to_codes(const void* indices, int indices_int64, int64_t n, int64_t index_stride, int d,
                                       int64_t codebook_size, void* codes, int dtype, const float* consts,
                                       const int32_t* ints, cudaStream_t stream);

// out[r] = table[indices[r]] for rows of row_bytes bytes (table (codebook_size + 1) rows, out n rows, both
// contiguous; any element type: this is a copy, in 16-byte units when sizes and addresses allow).
cudaError_t rlvrw_fsq_gather(const void* indices, int indices_int64, int64_t n, int64_t index_stride,
                             int64_t codebook_size, const void* table, int64_t row_bytes, void* out,
                             cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
