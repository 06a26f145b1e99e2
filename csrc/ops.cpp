// Torch glue for the rlvrw CUDA kernels: tensor checks, device guard, current stream, op registration.
// Compiled only against a CUDA build of torch (the .cu kernels themselves include no torch header).
//
//   rlvrw::logits_forward(Tensor logits, Tensor tokens, float inv_temperature, bool with_entropy)
//       -> (Tensor logp, Tensor lse, Tensor entropy)
//   rlvrw::logits_backward_(Tensor logits, Tensor tokens, float inv_temperature, Tensor lse, Tensor grad_logp,
//       Tensor? entropy, Tensor? grad_entropy, Tensor(a!) grad_logits) -> ()
//
// logits (N, V) or (B, T, V) float32 / bfloat16 / float16 with a contiguous last dim (any other strides: a [:, :-1]
// slice is read in place); tokens (N,) or (B*T,) int64; logp, lse, entropy (N,) float32 (entropy is an empty tensor
// when with_entropy is false). grad_logits has the logits' shape and dtype (any strides with a contiguous last dim);
// passing logits itself computes the gradient in place.
//
//   rlvrw::fsq_quantize(Tensor z, Tensor consts, Tensor ints) -> (Tensor codes, Tensor indices)
//   rlvrw::fsq_quantize_backward(Tensor z, Tensor grad_codes, Tensor consts) -> Tensor
//   rlvrw::fsq_codes_to_indices(Tensor codes, Tensor consts, Tensor ints) -> Tensor
//   rlvrw::fsq_indices_to_codes(Tensor indices, Tensor consts, Tensor ints, int codebook_size, ScalarType dtype)
//       -> Tensor
//   rlvrw::fsq_gather(Tensor indices, Tensor table) -> Tensor
//
// z / codes (B, S, d) float32 / bfloat16 / float16, any strides; codes come back with z's (dense) strides; indices
// int32 (B, S) from quantize, int32 or int64 (n,) into the others; table (codebook_size + 1, C) contiguous.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <tuple>

#include "rlvrw_kernels.h"

namespace rlvrw {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return RLVRW_DTYPE_FLOAT32;
    case at::kBFloat16:
      return RLVRW_DTYPE_BFLOAT16;
    case at::kHalf:
      return RLVRW_DTYPE_FLOAT16;
    default:
      TORCH_CHECK(false, "rlvrw: the tensor must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

// (N, V) or (B, T, V) logits as rows of a (B, T) grid (see rlvrw_kernels.h): the [:, :-1] slice of a (B, T + 1, V)
// tensor is passed as it is, without a copy.
struct Rows {
  int64_t n, per_seq, seq_stride, row_stride;
};

Rows rows_of(const at::Tensor& t) {
  if (t.dim() == 2) return {t.size(0), std::max<int64_t>(t.size(0), 1), 0, t.stride(0)};
  return {t.size(0) * t.size(1), std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1)};
}

// One past the last element of the rows, in bytes from the data pointer (for the overlap check).
int64_t rows_extent_bytes(const at::Tensor& t) {
  int64_t last = t.size(-1);
  for (int64_t d = 0; d + 1 < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return last * static_cast<int64_t>(t.element_size());
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cuda(), "rlvrw: ", name, " must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "rlvrw: ", name, " must be (N, V) or (B, T, V), got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(-1) <= 1 || logits.stride(-1) == 1, "rlvrw: ", name,
              " must be contiguous in its last dim, got strides ", logits.strides());
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) {
    TORCH_CHECK(logits.stride(d) >= 0, "rlvrw: ", name, " has a negative stride: ", logits.strides());
  }
  const int64_t row_dim = logits.dim() - 2;
  TORCH_CHECK(logits.size(row_dim) <= 1 || logits.size(-1) == 0 || logits.stride(row_dim) >= logits.size(-1),
              "rlvrw: ", name, " rows overlap (stride ", logits.stride(row_dim), " < V = ", logits.size(-1), ")");
  TORCH_CHECK(logits.size(-1) <= 2147483647, "rlvrw: vocabulary larger than 2^31-1 is not supported");
}

// A per-row vector: (N,) on logits' device with the given dtype; made contiguous when it is not (e.g. expanded).
at::Tensor per_row(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name) {
  const int64_t n = rows_of(logits).n;
  TORCH_CHECK(t.device() == logits.device(), "rlvrw: ", name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "rlvrw: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "rlvrw: ", name, " must have shape (", n, ",), got ", t.sizes());
  return t.contiguous();
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rlvrw: ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_forward_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                                                    double inv_temperature, bool with_entropy) {
  check_logits(logits, "logits");
  const int dtype = dtype_code(logits.scalar_type());
  const at::Tensor tok = per_row(tokens, logits, at::kLong, "tokens");
  const c10::cuda::CUDAGuard guard(logits.device());

  const Rows rows = rows_of(logits);
  const int64_t n = rows.n;
  const int64_t v = logits.size(-1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, opts);
  at::Tensor lse = at::empty({n}, opts);
  at::Tensor entropy = with_entropy ? at::empty({n}, opts) : at::empty({0}, opts);
  if (n == 0) return {logp, lse, entropy};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  check_cuda(rlvrw_logits_forward(logits.data_ptr(), dtype, n, v, rows.per_seq, rows.seq_stride, rows.row_stride,
                                  tok.data_ptr<int64_t>(), static_cast<float>(inv_temperature),
                                  logp.data_ptr<float>(), lse.data_ptr<float>(),
                                  with_entropy ? entropy.data_ptr<float>() : nullptr, stream),
             "rlvrw_logits_forward");
  return {logp, lse, entropy};
}

void logits_backward_cuda(const at::Tensor& logits, const at::Tensor& tokens, double inv_temperature,
                          const at::Tensor& lse, const at::Tensor& grad_logp,
                          const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_entropy,
                          const at::Tensor& grad_logits) {
  check_logits(logits, "logits");
  check_logits(grad_logits, "grad_logits");
  const int dtype = dtype_code(logits.scalar_type());
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "rlvrw: grad_logits must have the logits dtype ",
              logits.scalar_type(), ", got ", grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "rlvrw: grad_logits must have the logits shape ",
              logits.sizes(), ", got ", grad_logits.sizes());
  TORCH_CHECK(grad_logits.device() == logits.device(), "rlvrw: grad_logits must be on ", logits.device());

  const at::Tensor tok = per_row(tokens, logits, at::kLong, "tokens");
  const at::Tensor lse_c = per_row(lse, logits, at::kFloat, "lse");
  const at::Tensor glp = per_row(grad_logp, logits, at::kFloat, "grad_logp");
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor ent_c, ge_c;
  if (has_ge) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(),
                "rlvrw: logits_backward_ needs the forward's entropy when grad_entropy is given");
    ent_c = per_row(*entropy, logits, at::kFloat, "entropy");
    ge_c = per_row(*grad_entropy, logits, at::kFloat, "grad_entropy");
  }

  const Rows rows = rows_of(logits);
  const Rows grad_rows = rows_of(grad_logits);
  const int64_t n = rows.n;
  const int64_t v = logits.size(-1);
  if (n == 0 || v == 0) return;

  // In place (the same buffer, same layout) or into a buffer that does not overlap the logits at all.
  const bool same = grad_logits.data_ptr() == logits.data_ptr();
  if (same) {
    TORCH_CHECK(grad_rows.seq_stride == rows.seq_stride && grad_rows.row_stride == rows.row_stride,
                "rlvrw: in-place grad_logits must have the logits' strides");
  } else if (grad_logits.storage().is_alias_of(logits.storage())) {
    const auto lo_a = reinterpret_cast<intptr_t>(logits.data_ptr());
    const auto hi_a = lo_a + rows_extent_bytes(logits);
    const auto lo_b = reinterpret_cast<intptr_t>(grad_logits.data_ptr());
    const auto hi_b = lo_b + rows_extent_bytes(grad_logits);
    TORCH_CHECK(hi_a <= lo_b || hi_b <= lo_a,
                "rlvrw: grad_logits partially overlaps logits; pass logits itself for an in-place backward");
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  check_cuda(rlvrw_logits_backward_strided(
                 logits.data_ptr(), rows.per_seq, rows.seq_stride, rows.row_stride, grad_logits.data_ptr(),
                 grad_rows.seq_stride, grad_rows.row_stride, dtype, n, v, tok.data_ptr<int64_t>(),
                 static_cast<float>(inv_temperature), lse_c.data_ptr<float>(), glp.data_ptr<float>(),
                 has_ge ? ent_c.data_ptr<float>() : nullptr, has_ge ? ge_c.data_ptr<float>() : nullptr, stream),
             "rlvrw_logits_backward");
}

// ---------------------------------------------------------------------------------------------------------------
// FSQ (csrc/fsq.cu). Rows are (B, S, d) views with any strides; consts (4, d) float32 and ints (2, d) int32 on the
// device come from rlvrw.ops.fsq.kernel_constants.

void check_fsq_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rlvrw: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "rlvrw: ", name, " must be 3-D (B, S, d), got shape ", t.sizes());
}

void check_fsq_constants(const at::Tensor& consts, const at::Tensor& ints, int64_t d, const at::Device& device) {
  TORCH_CHECK(consts.device() == device && ints.device() == device, "rlvrw: FSQ constants must be on ", device);
  TORCH_CHECK(consts.scalar_type() == at::kFloat && consts.is_contiguous() && consts.dim() == 2 &&
                  consts.size(0) == 4 && consts.size(1) == d,
              "rlvrw: consts must be a contiguous float32 (4, ", d, ") tensor, got ", consts.sizes());
  TORCH_CHECK(ints.scalar_type() == at::kInt && ints.is_contiguous() && ints.dim() == 2 && ints.size(0) == 2 &&
                  ints.size(1) == d,
              "rlvrw: ints must be a contiguous int32 (2, ", d, ") tensor, got ", ints.sizes());
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor> fsq_quantize_cuda(const at::Tensor& z, const at::Tensor& consts,
                                                     const at::Tensor& ints) {
  check_fsq_rows(z, "z");
  const int dtype = dtype_code(z.scalar_type());
  check_fsq_constants(consts, ints, z.size(2), z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor codes = at::empty_like(z);
  at::Tensor indices = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kInt));
  check_cuda(rlvrw_fsq_quantize(z.data_ptr(), dtype, z.size(0), z.size(1), static_cast<int>(z.size(2)),
                                z.strides().data(), codes.data_ptr(), codes.strides().data(),
                                indices.data_ptr<int32_t>(), consts.data_ptr<float>(), ints.data_ptr<int32_t>(),
                                current_stream(z)),
             "rlvrw_fsq_quantize");
  return {codes, indices};
}

at::Tensor fsq_quantize_backward_cuda(const at::Tensor& z, const at::Tensor& grad_codes, const at::Tensor& consts) {
  check_fsq_rows(z, "z");
  const int dtype = dtype_code(z.scalar_type());
  TORCH_CHECK(grad_codes.sizes() == z.sizes() && grad_codes.scalar_type() == z.scalar_type() &&
                  grad_codes.device() == z.device(),
              "rlvrw: grad_codes must match z in shape, dtype and device");
  TORCH_CHECK(consts.device() == z.device() && consts.scalar_type() == at::kFloat && consts.is_contiguous() &&
                  consts.dim() == 2 && consts.size(0) == 4 && consts.size(1) == z.size(2),
              "rlvrw: consts must be a contiguous float32 (4, d) tensor on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor grad_z = at::empty_like(z);
  check_cuda(rlvrw_fsq_quantize_backward(z.data_ptr(), dtype, z.size(0), z.size(1), static_cast<int>(z.size(2)),
                                         z.strides().data(), grad_codes.data_ptr(), grad_codes.strides().data(),
                                         grad_z.data_ptr(), grad_z.strides().data(), consts.data_ptr<float>(),
                                         current_stream(z)),
             "rlvrw_fsq_quantize_backward");
  return grad_z;
}

at::Tensor fsq_codes_to_indices_cuda(const at::Tensor& codes, const at::Tensor& consts, const at::Tensor& ints) {
  check_fsq_rows(codes, "codes");
  const int dtype = dtype_code(codes.scalar_type());
  check_fsq_constants(consts, ints, codes.size(2), codes.device());
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor indices = at::empty({codes.size(0), codes.size(1)}, codes.options().dtype(at::kInt));
  check_cuda(rlvrw_fsq_codes_to_indices(codes.data_ptr(), dtype, codes.size(0), codes.size(1),
                                        static_cast<int>(codes.size(2)), codes.strides().data(),
                                        indices.data_ptr<int32_t>(), consts.data_ptr<float>(),
                                        ints.data_ptr<int32_t>(), current_stream(codes)),
             "rlvrw_fsq_codes_to_indices");
  return indices;
}

void check_fsq_indices(const at::Tensor& indices) {
  TORCH_CHECK(indices.is_cuda(), "rlvrw: indices must be a CUDA tensor, got ", indices.device());
  TORCH_CHECK(indices.dim() == 1, "rlvrw: indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "rlvrw: indices must be int32 or int64, got ", indices.scalar_type());
}

at::Tensor fsq_indices_to_codes_cuda(const at::Tensor& indices, const at::Tensor& consts, const at::Tensor& ints,
                                     int64_t codebook_size, at::ScalarType dtype) {
  check_fsq_indices(indices);
  const int code = dtype_code(dtype);
  check_fsq_constants(consts, ints, consts.size(1), indices.device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t d = consts.size(1);
  at::Tensor codes = at::empty({indices.size(0), d}, indices.options().dtype(dtype));
  check_cuda(rlvrw_fsq_indices_to_codes(indices.data_ptr(), indices.scalar_type() == at::kLong, indices.size(0),
                                        indices.stride(0), static_cast<int>(d), codebook_size, codes.data_ptr(), code,
                                        consts.data_ptr<float>(), ints.data_ptr<int32_t>(), current_stream(indices)),
             "rlvrw_fsq_indices_to_codes");
  return codes;
}

at::Tensor fsq_gather_cuda(const at::Tensor& indices, const at::Tensor& table) {
  check_fsq_indices(indices);
  TORCH_CHECK(table.device() == indices.device(), "rlvrw: table must be on ", indices.device());
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= 2 && table.is_contiguous(),
              "rlvrw: table must be a contiguous (codebook_size + 1, C) tensor, got ", table.sizes());
  const c10::cuda::CUDAGuard guard(indices.device());
  at::Tensor out = at::empty({indices.size(0), table.size(1)}, table.options());
  check_cuda(rlvrw_fsq_gather(indices.data_ptr(), indices.scalar_type() == at::kLong, indices.size(0),
                              indices.stride(0), table.size(0) - 1, table.data_ptr(),
                              table.size(1) * static_cast<int64_t>(table.element_size()), out.data_ptr(),
                              current_stream(indices)),
             "rlvrw_fsq_gather");
  return out;
}

}  // namespace
}  // namespace rlvrw

TORCH_LIBRARY(rlvrw, m) {
  m.def(
      "logits_forward(Tensor logits, Tensor tokens, float inv_temperature, bool with_entropy) "
      "-> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "logits_backward_(Tensor logits, Tensor tokens, float inv_temperature, Tensor lse, Tensor grad_logp, "
      "Tensor? entropy, Tensor? grad_entropy, Tensor(a!) grad_logits) -> ()");
  m.def("fsq_quantize(Tensor z, Tensor consts, Tensor ints) -> (Tensor codes, Tensor indices)");
  m.def("fsq_quantize_backward(Tensor z, Tensor grad_codes, Tensor consts) -> Tensor");
  m.def("fsq_codes_to_indices(Tensor codes, Tensor consts, Tensor ints) -> Tensor");
  m.def(
      "fsq_indices_to_codes(Tensor indices, Tensor consts, Tensor ints, int codebook_size, ScalarType dtype) "
      "-> Tensor");
  m.def("fsq_gather(Tensor indices, Tensor table) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlvrw, CUDA, m) {
  m.impl("logits_forward", &rlvrw::logits_forward_cuda);
  m.impl("logits_backward_", &rlvrw::logits_backward_cuda);
  m.impl("fsq_quantize", &rlvrw::fsq_quantize_cuda);
  m.impl("fsq_quantize_backward", &rlvrw::fsq_quantize_backward_cuda);
  m.impl("fsq_codes_to_indices", &rlvrw::fsq_codes_to_indices_cuda);
  m.impl("fsq_indices_to_codes", &rlvrw::fsq_indices_to_codes_cuda);
  m.impl("fsq_gather", &rlvrw::fsq_gather_cuda);
}

// `import rlvrw._C` loads this shared library, which runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rlvrw CUDA kernels (registers torch.ops.rlvrw.*)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
