// Shared by the logits kernels: dtype conversion, 16-byte vector loads and stores, the online softmax state and its
// warp reduction, the per-row forward and backward code, and the launch-shape choice. CUDA runtime only, no torch.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "rlvrw_kernels.h"

// Helpers are host+device so that csrc/testing/host_emulation.cu can run the very same row code on the CPU.
#define RLVRW_HD __host__ __device__ __forceinline__

namespace rlvrw {
namespace detail {

constexpr int kWarpSize = 32;
constexpr int kUnroll = 2;                 // 16-byte vectors in flight per thread per loop trip
constexpr int64_t kMaxGridBlocks = 1 << 21;  // rows beyond this are covered by a grid-stride loop

// ---------------------------------------------------------------------------------------------------------------
// Conversions. Explicit intrinsics only: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.
RLVRW_HD float to_float(float x) { return x; }
RLVRW_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
RLVRW_HD float to_float(__half x) { return __half2float(x); }

template <typename T>
RLVRW_HD T from_float(float x);
template <>
RLVRW_HD float from_float<float>(float x) { return x; }
template <>
RLVRW_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
RLVRW_HD __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// 16-bit element <-> raw bits.
RLVRW_HD float bits_to_float(unsigned short b, __nv_bfloat16*) {
  const unsigned u = static_cast<unsigned>(b) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
RLVRW_HD float bits_to_float(unsigned short b, __half*) { return __half2float(__ushort_as_half(b)); }
RLVRW_HD unsigned short float_to_bits(float x, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
RLVRW_HD unsigned short float_to_bits(float x, __half*) {
  return __half_as_ushort(__float2half_rn(x));
}

// Load 16 bytes (VecWidth<T> elements) from a 16-byte aligned address and widen to fp32.
template <typename T>
RLVRW_HD void load_vec(const T* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = bits_to_float(static_cast<unsigned short>(w[k] & 0xffffu), static_cast<T*>(nullptr));
    out[2 * k + 1] = bits_to_float(static_cast<unsigned short>(w[k] >> 16), static_cast<T*>(nullptr));
  }
}
template <>
RLVRW_HD void load_vec<float>(const float* p, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

// Narrow VecWidth<T> fp32 values to T and store them as one 16-byte write to a 16-byte aligned address.
template <typename T>
RLVRW_HD void store_vec(T* p, const float* in) {
  unsigned w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const unsigned lo = float_to_bits(in[2 * k], static_cast<T*>(nullptr));
    const unsigned hi = float_to_bits(in[2 * k + 1], static_cast<T*>(nullptr));
    w[k] = lo | (hi << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
template <>
RLVRW_HD void store_vec<float>(float* p, const float* in) {
  *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}

// Number of leading elements of a row read one by one before the row reaches a 16-byte boundary: the rest of the
// row is then read as 16-byte vectors (plus a scalar tail). A row not even element-aligned is read all scalar.
template <typename T>
RLVRW_HD int vec_head(const void* row, int vocab) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  if (a % sizeof(T) != 0) return vocab;
  const int h = static_cast<int>(((16 - (a & 15)) & 15) / sizeof(T));
  return h < vocab ? h : vocab;
}

// Where row n starts, in elements, when rows form a (B, T) grid: sequence n / rows_per_seq, position n % rows_per_seq
// (a plain (N, V) matrix is one sequence of N rows). The [:, :-1] slice of a (B, T + 1, V) tensor is read in place.
struct RowLayout {
  int64_t rows_per_seq, seq_stride, row_stride;
};

RLVRW_HD int64_t row_start(int64_t row, const RowLayout& l) {
  const int64_t seq = row / l.rows_per_seq;
  return seq * l.seq_stride + (row - seq * l.rows_per_seq) * l.row_stride;
}

// Clamp -inf to -FLT_MAX and leave every other value (NaN included) alone. Used on z - reference: exp of the
// clamped value is still exactly 0 while (clamped value) * 0 is 0 instead of NaN, so -inf logits (masked vocab
// entries, a fully masked row) never produce NaN through 0 * -inf.
RLVRW_HD float floor_finite(float d) { return d < -FLT_MAX ? -FLT_MAX : d; }

// ---------------------------------------------------------------------------------------------------------------
// Online softmax state over the values seen so far:
//   m = their max (-inf while none is finite),  s = sum exp(z - m),  t = sum exp(z - m) * (z - m).
// Then lse = m + log(s) and sum_j p_j z_j = m + t / s, so entropy = log(s) - t / s. Keeping t relative to m avoids
// the cancellation of lse - sum p z when the logits are large.
struct Online {
  float m, s, t;
};

RLVRW_HD Online online_identity() { return Online{-INFINITY, 0.f, 0.f}; }

// Fold N values into the state with one rescale for the whole chunk. Without kEntropy, t is not accumulated
// (it stays 0) and the per-element clamp is not needed: exp(-inf) is 0 by itself.
template <int N, bool kEntropy>
RLVRW_HD void online_update(Online& st, const float* z) {
  float cm = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) cm = fmaxf(cm, z[k]);
  const float mn = fmaxf(st.m, cm);
  // Reference point of the exponentials: the new max, or 0 while everything seen is -inf (then every z - ref is
  // -inf, clamped, and contributes exactly 0).
  const float ref = (mn == -INFINITY) ? 0.f : mn;
  if (mn != st.m) {
    const float d = floor_finite(st.m - ref);
    const float a = expf(d);
    st.t = a * fmaf(d, st.s, st.t);
    st.s = a * st.s;
    st.m = mn;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (kEntropy) {
      const float d = floor_finite(z[k] - ref);
      const float e = expf(d);
      st.s += e;
      st.t = fmaf(e, d, st.t);
    } else {
      st.s += expf(z[k] - ref);
    }
  }
}

RLVRW_HD Online online_merge(const Online& a, const Online& b) {
  const float mn = fmaxf(a.m, b.m);
  const float ref = (mn == -INFINITY) ? 0.f : mn;
  const float da = floor_finite(a.m - ref);
  const float db = floor_finite(b.m - ref);
  const float ea = expf(da);
  const float eb = expf(db);
  Online r;
  r.m = mn;
  r.s = ea * a.s + eb * b.s;
  r.t = ea * fmaf(da, a.s, a.t) + eb * fmaf(db, b.s, b.t);
  return r;
}

__device__ __forceinline__ Online warp_reduce(Online st) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    Online o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    st = online_merge(st, o);
  }
  return st;
}

// ---------------------------------------------------------------------------------------------------------------
// Row code. THREADS threads share a row; `lane` in [0, THREADS) picks this thread's elements: a scalar head up to
// the first 16-byte boundary, then 16-byte vectors (kUnroll of them per trip), then a scalar tail.

// Forward: this lane's online state over its elements of row x (z = x * inv_t); t only when kEntropy.
template <typename T, int THREADS, bool kEntropy>
RLVRW_HD Online forward_row_partial(const T* x, int vocab, float inv_t, int lane) {
  constexpr int VEC = VecWidth<T>::value;
  Online st = online_identity();
  const int head = vec_head<T>(x, vocab);
  for (int j = lane; j < head; j += THREADS) {
    const float z = to_float(x[j]) * inv_t;
    online_update<1, kEntropy>(st, &z);
  }
  const T* xv = x + head;
  const int nvec = (vocab - head) / VEC;
  int i = lane;
  for (; i + (kUnroll - 1) * THREADS < nvec; i += kUnroll * THREADS) {
    float z[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T>(xv + static_cast<int64_t>(i + u * THREADS) * VEC, z + u * VEC);
#pragma unroll
    for (int k = 0; k < kUnroll * VEC; ++k) z[k] *= inv_t;
    online_update<kUnroll * VEC, kEntropy>(st, z);
  }
  for (; i < nvec; i += THREADS) {
    float z[VEC];
    load_vec<T>(xv + static_cast<int64_t>(i) * VEC, z);
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] *= inv_t;
    online_update<VEC, kEntropy>(st, z);
  }
  for (int j = head + nvec * VEC + lane; j < vocab; j += THREADS) {
    const float z = to_float(x[j]) * inv_t;
    online_update<1, kEntropy>(st, &z);
  }
  return st;
}

struct RowOut {
  float logp, lse, entropy;
};

// Forward outputs of a row from its fully reduced state and its target logit (x_tok, raw; has_tok false when the
// token is out of range). s == 0 exactly when nothing was finite (all -inf, or vocab == 0): lse = -inf,
// logp = -inf, entropy = 0. Otherwise s >= 1 (the max contributes exp(0) = 1).
RLVRW_HD RowOut forward_row_finish(const Online& st, bool has_tok, float x_tok, float inv_t) {
  const bool empty = (st.s == 0.f);
  const float log_s = logf(st.s);
  RowOut r;
  r.lse = empty ? -INFINITY : st.m + log_s;
  r.logp = (empty || !has_tok) ? -INFINITY : (x_tok * inv_t - st.m) - log_s;
  r.entropy = empty ? 0.f : log_s - st.t / st.s;
  return r;
}

// Gradient of one logit given its row's constants (ref = lse, or 0 for a fully -inf row whose lse is -inf).
//   d = z - lse (clamped so that a -inf logit gives p = 0 and no 0 * inf), p = exp(d)
//   grad = inv_t * ( g * ([j == tok] - p) - ge * p * (d + h) )
template <bool kEntropy>
RLVRW_HD float grad_one(float x, bool is_tok, float inv_t, float ref, float g, float ge, float h) {
  const float d0 = x * inv_t - ref;
  const float d = kEntropy ? floor_finite(d0) : d0;  // the clamp only matters for p * d
  const float p = expf(d);
  float r = g * ((is_tok ? 1.f : 0.f) - p);
  if (kEntropy) r -= ge * p * (d + h);
  return inv_t * r;
}

// This lane's elements of one row set to 0: scalar head, 16-byte vectors, scalar tail.
template <typename T, int THREADS>
RLVRW_HD void zero_row(T* gx, int vocab, int lane) {
  constexpr int VEC = VecWidth<T>::value;
  const int head = vec_head<T>(gx, vocab);
  const T zero = from_float<T>(0.f);
  for (int j = lane; j < head; j += THREADS) gx[j] = zero;
  const int nvec = (vocab - head) / VEC;
  const float zeros[VEC] = {};
  for (int i = lane; i < nvec; i += THREADS) store_vec<T>(gx + head + static_cast<int64_t>(i) * VEC, zeros);
  for (int j = head + nvec * VEC + lane; j < vocab; j += THREADS) gx[j] = zero;
}

// Backward: this lane's elements of one row, x -> gx (gx may be x: each element is read, then written, by the
// same thread). Vector path only when both rows sit at the same offset from a 16-byte boundary. A row without
// upstream gradient (g = ge = 0: a masked position) gets zeros and is not read, whatever its logits hold.
template <typename T, int THREADS, bool kEntropy>
RLVRW_HD void backward_row(const T* x, T* gx, int vocab, int64_t tok, float inv_t, float lse, float g, float ge,
                           float h, int lane) {
  constexpr int VEC = VecWidth<T>::value;
  if (g == 0.f && ge == 0.f) {
    zero_row<T, THREADS>(gx, vocab, lane);
    return;
  }
  const float ref = (lse == -INFINITY) ? 0.f : lse;
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x);
  const uintptr_t ga = reinterpret_cast<uintptr_t>(gx);
  const int head = ((xa & 15) == (ga & 15)) ? vec_head<T>(x, vocab) : vocab;
  // Out-of-range tokens never equal a column index in [0, vocab): no one-hot term.
  const int t = (tok >= 0 && tok < vocab) ? static_cast<int>(tok) : -1;
  for (int j = lane; j < head; j += THREADS) {
    gx[j] = from_float<T>(grad_one<kEntropy>(to_float(x[j]), j == t, inv_t, ref, g, ge, h));
  }
  const T* xv = x + head;
  T* gv = gx + head;
  const int nvec = (vocab - head) / VEC;
  int i = lane;
  for (; i + (kUnroll - 1) * THREADS < nvec; i += kUnroll * THREADS) {
    float v[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T>(xv + static_cast<int64_t>(i + u * THREADS) * VEC, v + u * VEC);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j0 = head + (i + u * THREADS) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v[u * VEC + k] = grad_one<kEntropy>(v[u * VEC + k], j0 + k == t, inv_t, ref, g, ge, h);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_vec<T>(gv + static_cast<int64_t>(i + u * THREADS) * VEC, v + u * VEC);
  }
  for (; i < nvec; i += THREADS) {
    float v[VEC];
    load_vec<T>(xv + static_cast<int64_t>(i) * VEC, v);
    const int j0 = head + i * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = grad_one<kEntropy>(v[k], j0 + k == t, inv_t, ref, g, ge, h);
    store_vec<T>(gv + static_cast<int64_t>(i) * VEC, v);
  }
  for (int j = head + nvec * VEC + lane; j < vocab; j += THREADS) {
    gx[j] = from_float<T>(grad_one<kEntropy>(to_float(x[j]), j == t, inv_t, ref, g, ge, h));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch shapes. THREADS threads cooperate on one row; a block of BLOCK threads holds BLOCK / THREADS rows.
// Small vocabularies get one warp per row (8 rows per 256-thread block, no shared memory, no block barrier);
// large ones one block per row with a warp-shuffle + shared-memory reduction.
enum class Shape { kWarpPerRow, kBlock256, kBlock512 };

inline Shape choose_shape(int64_t vocab) {
  if (vocab <= 8192) return Shape::kWarpPerRow;
  if (vocab <= 32768) return Shape::kBlock256;
  return Shape::kBlock512;
}

inline unsigned grid_for(int64_t n_rows, int rows_per_block) {
  int64_t g = (n_rows + rows_per_block - 1) / rows_per_block;
  if (g > kMaxGridBlocks) g = kMaxGridBlocks;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

// Rows of a (B, T) grid: at least one row per sequence, non-negative strides, rows of one sequence that do not
// overlap (row_stride >= vocab whenever a sequence has two rows).
inline bool valid_layout(int64_t n_rows, int64_t vocab, int64_t rows_per_seq, int64_t seq_stride,
                         int64_t row_stride) {
  if (rows_per_seq < 1 || seq_stride < 0 || row_stride < 0) return false;
  const int64_t per_seq = n_rows < rows_per_seq ? n_rows : rows_per_seq;
  return per_seq <= 1 || row_stride >= vocab;
}

inline bool valid_dtype(int dtype) {
  return dtype == RLVRW_DTYPE_FLOAT32 || dtype == RLVRW_DTYPE_BFLOAT16 || dtype == RLVRW_DTYPE_FLOAT16;
}

}  // namespace detail
}  // namespace rlvrw
