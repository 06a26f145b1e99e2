// CPU check of the logits kernels' row code, no GPU needed.
//
// The kernels in csrc/logits_*.cu are thin shells around host+device row functions (logits_common.cuh):
// forward_row_partial / online_merge / forward_row_finish and backward_row. This program runs those same functions
// on the host, lane by lane, with the same warp butterfly and block reduction order as the kernels, for every
// launch shape, dtype, odd vocabularies, misaligned rows, masked (-inf) entries, fully masked rows, out-of-range
// tokens, in-place and out-of-place backward, rows laid out as the [:, :-1] slice of a (B, T + 1, V) tensor, rows
// without upstream gradient (zeros whatever they hold), and compares with float64 math. Only the CUDA parts (shuffles,
// shared memory, the grid loop, launches) are not exercised here.
//
// The FSQ kernels (csrc/fsq.cu) are checked the same way: their per-dimension row functions (quantize level, index
// accumulation, straight-through gradient, strided row offsets, gather copy unit) against float64 math over every
// code of every level set in DESIGN.md.
//
// Build and run (tests/test_csrc_build.py does this):
//   nvcc -std=c++17 -O1 -o host_emulation csrc/testing/host_emulation.cu && ./host_emulation
// Exit status 0 when every check passes.
#include "../logits_common.cuh"
#include "../fsq.cu"  // its row functions (fsq_level, RowIndex, fsq_grad, row_offset, gather_unit) run here

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace rlvrw::detail;

namespace {

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
  if (g_failures < 30) std::printf("FAIL: %s\n", what.c_str());
  ++g_failures;
}

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "fp32"; }
template <>
const char* type_name<__nv_bfloat16>() { return "bf16"; }
template <>
const char* type_name<__half>() { return "fp16"; }

// A byte buffer with 16-byte aligned storage; element pointers into it may be deliberately misaligned.
struct Buffer {
  std::vector<uint4> words;
  explicit Buffer(size_t bytes) : words(bytes / 16 + 2) {}
  unsigned char* bytes() { return reinterpret_cast<unsigned char*>(words.data()); }
};

// Emulates logits_forward_kernel for one launch shape.
template <typename T, int THREADS>
void emulate_forward(const T* logits, int64_t n_rows, int vocab, const RowLayout& layout, const int64_t* tokens,
                     float inv_t, float* logp, float* lse, float* entropy) {
  constexpr int NWARPS = THREADS / kWarpSize;
  std::vector<Online> st(THREADS), tmp(THREADS);
  for (int64_t row = 0; row < n_rows; ++row) {
    const T* x = logits + row_start(row, layout);
    for (int lane = 0; lane < THREADS; ++lane) {
      st[lane] = entropy != nullptr ? forward_row_partial<T, THREADS, true>(x, vocab, inv_t, lane)
                                    : forward_row_partial<T, THREADS, false>(x, vocab, inv_t, lane);
    }
    // __shfl_xor_sync butterfly inside every warp: lane l merges (own, partner l ^ off).
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      for (int lane = 0; lane < THREADS; ++lane) {
        const int partner = (lane / kWarpSize) * kWarpSize + ((lane % kWarpSize) ^ off);
        tmp[lane] = online_merge(st[lane], st[partner]);
      }
      st.swap(tmp);
    }
    Online fin = st[0];
    if (NWARPS > 1) {  // warp 0 reduces the per-warp results through shared memory
      std::vector<Online> w(kWarpSize), wt(kWarpSize);
      for (int l = 0; l < kWarpSize; ++l) w[l] = l < NWARPS ? st[l * kWarpSize] : online_identity();
      for (int off = kWarpSize / 2; off > 0; off >>= 1) {
        for (int l = 0; l < kWarpSize; ++l) wt[l] = online_merge(w[l], w[l ^ off]);
        w.swap(wt);
      }
      fin = w[0];
    }
    float x_tok = -INFINITY;
    bool has_tok = false;
    if (tokens != nullptr) {
      const int64_t tok = tokens[row];
      has_tok = tok >= 0 && tok < vocab;
      if (has_tok) x_tok = to_float(x[tok]);
    }
    const RowOut r = forward_row_finish(fin, has_tok, x_tok, inv_t);
    lse[row] = r.lse;
    logp[row] = r.logp;
    if (entropy != nullptr) entropy[row] = r.entropy;
  }
}

// Emulates logits_backward_kernel for one launch shape.
template <typename T, int THREADS, bool kEntropy>
void emulate_backward(const T* logits, const RowLayout& layout, T* grad, const RowLayout& grad_layout, int64_t n_rows,
                      int vocab, const int64_t* tokens, float inv_t, const float* lse, const float* grad_logp,
                      const float* entropy, const float* grad_entropy) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const float g = grad_logp != nullptr ? grad_logp[row] : 0.f;
    const float ge = kEntropy ? grad_entropy[row] : 0.f;
    const float h = kEntropy ? entropy[row] : 0.f;
    const int64_t tok = tokens != nullptr ? tokens[row] : -1;
    for (int lane = 0; lane < THREADS; ++lane) {
      backward_row<T, THREADS, kEntropy>(logits + row_start(row, layout), grad + row_start(row, grad_layout), vocab,
                                         tok, inv_t, lse[row], g, ge, h, lane);
    }
  }
}

bool close(double got, double want, double atol, double rtol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

struct RefRow {
  double lse, logp, entropy;
  std::vector<double> p, d;  // p_j and z_j - lse (d = -inf where z = -inf)
};

// float64 reference of one row (the inputs are the exact values the kernel sees).
RefRow reference_row(const std::vector<float>& xf, int64_t tok, double inv_t) {
  const int v = static_cast<int>(xf.size());
  RefRow r;
  double m = -INFINITY;
  for (float x : xf) m = std::fmax(m, double(x) * inv_t);
  r.p.assign(v, 0.0);
  r.d.assign(v, -INFINITY);
  if (m == -INFINITY) {
    r.lse = -INFINITY;
    r.logp = -INFINITY;
    r.entropy = 0.0;
    return r;
  }
  double s = 0;
  for (float x : xf) s += std::exp(double(x) * inv_t - m);
  r.lse = m + std::log(s);
  double pz = 0;
  for (int j = 0; j < v; ++j) {
    const double z = double(xf[j]) * inv_t;
    if (z == -INFINITY) continue;
    r.d[j] = z - r.lse;
    r.p[j] = std::exp(r.d[j]);
    pz += r.p[j] * r.d[j];
  }
  r.entropy = -pz;
  r.logp = (tok >= 0 && tok < v) ? double(xf[tok]) * inv_t - r.lse : -INFINITY;
  return r;
}

template <typename T>
double grad_rtol() {
  return sizeof(T) == 4 ? 1e-4 : (std::is_same<T, __half>::value ? 2e-3 : 1.6e-2);
}

template <typename T, int THREADS>
void run_case(std::mt19937& rng, int vocab, int n_rows, int64_t pad, int elem_offset, bool special_rows) {
  const int64_t stride = vocab + pad;
  const RowLayout plain{n_rows, 0, stride};  // an (N, V) matrix with row stride `stride`
  const float inv_t = 1.0f / 0.7f;
  char name[160];
  std::snprintf(name, sizeof(name), "%s THREADS=%d V=%d rows=%d pad=%lld offset=%d", type_name<T>(), THREADS, vocab,
                n_rows, static_cast<long long>(pad), elem_offset);

  Buffer buf((n_rows * stride + elem_offset + 16) * sizeof(T));
  T* logits = reinterpret_cast<T*>(buf.bytes()) + elem_offset;
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_int_distribution<int64_t> pick(0, vocab > 0 ? vocab - 1 : 0);
  std::vector<int64_t> tokens(n_rows);
  for (int r = 0; r < n_rows; ++r) {
    float shift = 0.f;
    if (special_rows && r % 5 == 3) shift = 40.f;  // large logits: the online max must keep the sums in range
    for (int j = 0; j < vocab; ++j) logits[r * stride + j] = from_float<T>(normal(rng) + shift);
    for (int64_t j = vocab; j < stride; ++j) logits[r * stride + j] = from_float<T>(12345.f);  // padding: never read
    tokens[r] = vocab > 0 ? pick(rng) : 0;
  }
  if (special_rows && n_rows >= 5 && vocab >= 4) {
    for (int j = 0; j < vocab; ++j) logits[0 * stride + j] = from_float<T>(-INFINITY);      // fully masked row
    for (int j = 0; j < vocab; j += 3) logits[1 * stride + j] = from_float<T>(-INFINITY);   // partly masked row
    tokens[1] = 0;  // target is a masked entry: logp = -inf, and the gradient stays finite
    tokens[2] = -100;                                                                         // ignore-index style
    tokens[4] = vocab;                                                                        // one past the end
  }

  // Values exactly as the kernel sees them.
  std::vector<std::vector<float>> xf(n_rows, std::vector<float>(vocab));
  for (int r = 0; r < n_rows; ++r)
    for (int j = 0; j < vocab; ++j) xf[r][j] = to_float(logits[r * stride + j]);

  // ---- forward
  std::vector<float> logp(n_rows, NAN), lse(n_rows, NAN), ent(n_rows, NAN);
  emulate_forward<T, THREADS>(logits, n_rows, vocab, plain, tokens.data(), inv_t, logp.data(), lse.data(),
                              ent.data());
  std::vector<RefRow> ref(n_rows);
  for (int r = 0; r < n_rows; ++r) {
    ref[r] = reference_row(xf[r], tokens[r], double(inv_t));
    const double scale = 1.0 + std::fabs(ref[r].lse);
    ++g_checks;
    if (!close(lse[r], ref[r].lse, 2e-6 * scale, 2e-6) || !close(logp[r], ref[r].logp, 2e-5 * scale, 2e-6) ||
        !close(ent[r], ref[r].entropy, 2e-5 * scale, 1e-5)) {
      char msg[400];
      std::snprintf(msg, sizeof(msg), "%s forward row %d: lse %.9g vs %.9g, logp %.9g vs %.9g, entropy %.9g vs %.9g",
                    name, r, lse[r], ref[r].lse, logp[r], ref[r].logp, ent[r], ref[r].entropy);
      fail(msg);
    }
  }
  // entropy pointer NULL must not change the rest
  std::vector<float> logp2(n_rows, NAN), lse2(n_rows, NAN);
  emulate_forward<T, THREADS>(logits, n_rows, vocab, plain, tokens.data(), inv_t, logp2.data(), lse2.data(),
                              nullptr);
  ++g_checks;
  if (std::memcmp(logp2.data(), logp.data(), n_rows * sizeof(float)) != 0 ||
      std::memcmp(lse2.data(), lse.data(), n_rows * sizeof(float)) != 0) {
    fail(std::string(name) + " forward without entropy differs");
  }

  // ---- backward
  std::vector<float> g(n_rows), ge(n_rows);
  std::normal_distribution<float> unit(0.f, 1.f);
  for (int r = 0; r < n_rows; ++r) {
    g[r] = unit(rng);
    ge[r] = unit(rng);
  }
  for (int with_ent = 0; with_ent < 2; ++with_ent) {
    // out of place: a NaN-poisoned buffer with another stride and alignment offset (scalar path when the offsets
    // from a 16-byte boundary differ), then in place on a copy of the logits.
    const int64_t gstride = stride + 1;
    const RowLayout gplain{n_rows, 0, gstride};
    const int goff = elem_offset + 1;
    Buffer gbuf((n_rows * gstride + goff + 16) * sizeof(T));
    T* grad = reinterpret_cast<T*>(gbuf.bytes()) + goff;
    for (int64_t k = 0; k < n_rows * gstride; ++k) grad[k] = from_float<T>(NAN);
    Buffer ibuf((n_rows * stride + elem_offset + 16) * sizeof(T));
    T* inplace = reinterpret_cast<T*>(ibuf.bytes()) + elem_offset;
    std::memcpy(inplace, logits, n_rows * stride * sizeof(T));
    // same layout out of place: exercises the vector path like the in-place run
    Buffer sbuf((n_rows * stride + elem_offset + 16) * sizeof(T));
    T* same = reinterpret_cast<T*>(sbuf.bytes()) + elem_offset;
    for (int64_t k = 0; k < n_rows * stride; ++k) same[k] = from_float<T>(NAN);
    if (with_ent) {
      emulate_backward<T, THREADS, true>(logits, plain, grad, gplain, n_rows, vocab, tokens.data(), inv_t,
                                         lse.data(), g.data(), ent.data(), ge.data());
      emulate_backward<T, THREADS, true>(inplace, plain, inplace, plain, n_rows, vocab, tokens.data(), inv_t,
                                         lse.data(), g.data(), ent.data(), ge.data());
      emulate_backward<T, THREADS, true>(logits, plain, same, plain, n_rows, vocab, tokens.data(), inv_t,
                                         lse.data(), g.data(), ent.data(), ge.data());
    } else {
      emulate_backward<T, THREADS, false>(logits, plain, grad, gplain, n_rows, vocab, tokens.data(), inv_t,
                                          lse.data(), g.data(), nullptr, nullptr);
      emulate_backward<T, THREADS, false>(inplace, plain, inplace, plain, n_rows, vocab, tokens.data(), inv_t,
                                          lse.data(), g.data(), nullptr, nullptr);
      emulate_backward<T, THREADS, false>(logits, plain, same, plain, n_rows, vocab, tokens.data(), inv_t,
                                          lse.data(), g.data(), nullptr, nullptr);
    }
    int bad = 0;
    for (int r = 0; r < n_rows && bad < 3; ++r) {
      const double gl = g[r], gen = with_ent ? ge[r] : 0.0, h = ref[r].entropy;
      double gmax = 1e-30;
      std::vector<double> want(vocab);
      for (int j = 0; j < vocab; ++j) {
        const double p = ref[r].p[j];
        const double ent_term = p > 0 ? p * (ref[r].d[j] + h) : 0.0;
        want[j] = double(inv_t) * (gl * ((j == tokens[r] ? 1.0 : 0.0) - p) - gen * ent_term);
        gmax = std::fmax(gmax, std::fabs(want[j]));
      }
      for (int j = 0; j < vocab && bad < 3; ++j) {
        const float a = to_float(grad[r * gstride + j]);
        const float b = to_float(inplace[r * stride + j]);
        const float c = to_float(same[r * stride + j]);
        ++g_checks;
        // bf16/fp16 results are rounded once from fp32: relative tolerance of the format. Absolute part: fp32
        // rounding of z - lse (an ulp of |lse|) times the upstream gradients, which dominates 1 - p when one token
        // takes nearly all the mass; plus a little relative to the row's largest gradient (fp16 underflow).
        const double atol = 1e-6 * gmax + (std::is_same<T, __half>::value ? 1e-7 : 0.0) +
                            2.4e-7 * (1.0 + std::fabs(ref[r].lse)) * double(inv_t) *
                                (std::fabs(gl) + std::fabs(gen) * (1.0 + std::fabs(h)));
        if (!close(a, want[j], atol, grad_rtol<T>()) || std::memcmp(&a, &b, sizeof(a)) != 0 ||
            std::memcmp(&a, &c, sizeof(a)) != 0) {
          char msg[400];
          std::snprintf(msg, sizeof(msg),
                        "%s backward (entropy=%d) row %d col %d: out-of-place %.9g, in-place %.9g, same-layout %.9g,"
                        " want %.9g",
                        name, with_ent, r, j, a, b, c, want[j]);
          fail(msg);
          ++bad;
        }
      }
      // padding columns of the in-place buffer must be untouched
      const float pad_value = to_float(from_float<T>(12345.f));
      for (int64_t j = vocab; j < stride; ++j) {
        ++g_checks;
        if (to_float(inplace[r * stride + j]) != pad_value) {
          fail(std::string(name) + " backward wrote into the row padding");
          ++bad;
          break;
        }
      }
    }
  }
}

// NaN logits must give NaN outputs, not be silently skipped.
template <typename T>
void nan_case() {
  const int vocab = 37;
  std::vector<T> x(vocab);
  for (int j = 0; j < vocab; ++j) x[j] = from_float<T>(0.1f * j);
  x[5] = from_float<T>(NAN);
  const int64_t tok = 2;
  float logp, lse, ent;
  emulate_forward<T, 32>(x.data(), 1, vocab, RowLayout{1, 0, vocab}, &tok, 1.f, &logp, &lse, &ent);
  ++g_checks;
  if (!std::isnan(lse) || !std::isnan(logp) || !std::isnan(ent)) fail(std::string(type_name<T>()) + " NaN row");
}

// The [:, :-1] slice of a (B, T + 1, V) buffer, read in place as a (B, T) grid of rows: the same bits as the dense
// (B * T, V) copy of that slice, forward and backward (in place, and out of place into a grid with its own strides);
// the dropped last position of every sequence is never written.
template <typename T, int THREADS>
void grid_case(std::mt19937& rng, int vocab, int batch, int seq_len, int elem_offset) {
  char name[120];
  std::snprintf(name, sizeof(name), "%s THREADS=%d grid %dx%d V=%d offset=%d", type_name<T>(), THREADS, batch,
                seq_len, vocab, elem_offset);
  const int64_t n = static_cast<int64_t>(batch) * seq_len;
  const RowLayout slice{seq_len, static_cast<int64_t>(seq_len + 1) * vocab, vocab};
  const RowLayout dense{n, 0, vocab};
  const size_t full = static_cast<size_t>(batch) * (seq_len + 1) * vocab;
  Buffer buf((full + elem_offset + 16) * sizeof(T)), dbuf((n * vocab + 16) * sizeof(T));
  T* x = reinterpret_cast<T*>(buf.bytes()) + elem_offset;
  T* d = reinterpret_cast<T*>(dbuf.bytes());
  std::normal_distribution<float> normal(0.f, 3.f);
  for (size_t k = 0; k < full; ++k) x[k] = from_float<T>(normal(rng));
  for (int64_t r = 0; r < n; ++r) std::memcpy(d + r * vocab, x + row_start(r, slice), vocab * sizeof(T));
  std::vector<int64_t> tokens(n);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  for (auto& t : tokens) t = pick(rng);
  const float inv_t = 1.3f;
  std::vector<float> a(3 * n), b(3 * n);
  emulate_forward<T, THREADS>(x, n, vocab, slice, tokens.data(), inv_t, a.data(), a.data() + n, a.data() + 2 * n);
  // row by row at the same addresses (the same head/body/tail split, so the same bits)
  for (int64_t r = 0; r < n; ++r) {
    emulate_forward<T, THREADS>(x + row_start(r, slice), 1, vocab, RowLayout{1, 0, vocab}, &tokens[r], inv_t,
                                &b[r], &b[n + r], &b[2 * n + r]);
  }
  ++g_checks;
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) fail(std::string(name) + " forward differs");

  std::vector<float> g(n), ge(n);
  for (int64_t r = 0; r < n; ++r) {
    g[r] = normal(rng);
    ge[r] = normal(rng);
  }
  const float* lse = a.data() + n;
  const float* ent = a.data() + 2 * n;
  // out of place into a grid with its own sequence stride (one element of padding per sequence)
  const RowLayout out_layout{seq_len, static_cast<int64_t>(seq_len) * vocab + 1, vocab};
  Buffer obuf((static_cast<size_t>(batch) * (seq_len * vocab + 1) + 16) * sizeof(T));
  T* out = reinterpret_cast<T*>(obuf.bytes());
  emulate_backward<T, THREADS, true>(x, slice, out, out_layout, n, vocab, tokens.data(), inv_t, lse, g.data(), ent,
                                     ge.data());
  emulate_backward<T, THREADS, true>(d, dense, d, dense, n, vocab, tokens.data(), inv_t, lse, g.data(), ent,
                                     ge.data());
  std::vector<T> last(static_cast<size_t>(batch) * vocab);
  for (int bi = 0; bi < batch; ++bi) {
    std::memcpy(last.data() + bi * vocab, x + (static_cast<int64_t>(bi) * (seq_len + 1) + seq_len) * vocab,
                vocab * sizeof(T));
  }
  emulate_backward<T, THREADS, true>(x, slice, x, slice, n, vocab, tokens.data(), inv_t, lse, g.data(), ent,
                                     ge.data());
  bool same = true;
  for (int64_t r = 0; r < n; ++r) {
    same &= std::memcmp(x + row_start(r, slice), d + r * vocab, vocab * sizeof(T)) == 0;
    same &= std::memcmp(out + row_start(r, out_layout), d + r * vocab, vocab * sizeof(T)) == 0;
  }
  bool untouched = true;
  for (int bi = 0; bi < batch; ++bi) {
    untouched &= std::memcmp(last.data() + bi * vocab,
                             x + (static_cast<int64_t>(bi) * (seq_len + 1) + seq_len) * vocab, vocab * sizeof(T)) == 0;
  }
  g_checks += 2;
  if (!same) fail(std::string(name) + " backward differs from the dense copy's");
  if (!untouched) fail(std::string(name) + " backward wrote into the dropped last position");
}

// Rows without upstream gradient (g = ge = 0, a masked position) get exactly 0 whatever they hold (NaN, +inf, all
// -inf), in place and out of place; a NaN row that does get a gradient stays NaN.
template <typename T, int THREADS>
void dead_rows_case(int vocab) {
  const int n = 5;
  const RowLayout layout{n, 0, vocab};
  std::vector<T> x(static_cast<size_t>(n) * vocab);
  for (int r = 0; r < n; ++r)
    for (int j = 0; j < vocab; ++j) x[r * vocab + j] = from_float<T>(0.01f * ((j * 7 + r) % 13));
  x[0 * vocab + 3 % vocab] = from_float<T>(NAN);
  x[1 * vocab + 1 % vocab] = from_float<T>(INFINITY);
  for (int j = 0; j < vocab; ++j) x[2 * vocab + j] = from_float<T>(-INFINITY);
  x[4 * vocab + 2 % vocab] = from_float<T>(NAN);
  const std::vector<int64_t> tokens = {1 % vocab, 2 % vocab, 0, 3 % vocab, 4 % vocab};
  std::vector<float> logp(n), lse(n), ent(n);
  emulate_forward<T, THREADS>(x.data(), n, vocab, layout, tokens.data(), 1.f, logp.data(), lse.data(), ent.data());
  const std::vector<float> g = {0.f, 0.f, 0.f, 0.5f, 0.5f}, ge = {0.f, 0.f, 0.f, -1.f, 0.f};
  std::vector<T> out(x.size(), from_float<T>(NAN)), inplace = x;
  emulate_backward<T, THREADS, true>(x.data(), layout, out.data(), layout, n, vocab, tokens.data(), 1.f, lse.data(),
                                     g.data(), ent.data(), ge.data());
  emulate_backward<T, THREADS, true>(inplace.data(), layout, inplace.data(), layout, n, vocab, tokens.data(), 1.f,
                                     lse.data(), g.data(), ent.data(), ge.data());
  bool zeros = true, finite = true, nan_kept = true;
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < vocab; ++j) {
      const float a = to_float(out[r * vocab + j]), b = to_float(inplace[r * vocab + j]);
      if (r < 3) zeros &= (a == 0.f && b == 0.f);
      finite &= std::isfinite(a) && std::isfinite(b);
    }
  }
  for (int j = 0; j < vocab; ++j) nan_kept &= std::isnan(to_float(out[4 * vocab + j]));
  char name[80];
  std::snprintf(name, sizeof(name), "%s THREADS=%d V=%d", type_name<T>(), THREADS, vocab);
  g_checks += 3;
  if (!zeros) fail(std::string(name) + ": a row without upstream gradient got a nonzero gradient");
  if (!finite) fail(std::string(name) + ": a non-finite gradient in a masked or finite row");
  if (!nan_kept) fail(std::string(name) + ": a NaN row with a gradient must stay NaN");
}

template <typename T>
void run_dtype(std::mt19937& rng) {
  const int small_vocab[] = {1, 2, 3, 7, 8, 9, 15, 17, 31, 33, 100, 257, 1000, 4633};
  for (int v : small_vocab) {
    for (int offset : {0, 1, 3}) {
      run_case<T, 32>(rng, v, 7, (v * 3 + offset) % 5, offset, true);
    }
  }
  run_case<T, 32>(rng, 8192, 5, 0, 0, true);
  run_case<T, 32>(rng, 4633, 6, 7, 2, true);
  run_case<T, 256>(rng, 8193, 5, 1, 1, true);
  run_case<T, 256>(rng, 12345, 5, 0, 0, true);
  run_case<T, 256>(rng, 100, 5, 0, 1, true);  // fewer elements than threads
  run_case<T, 512>(rng, 40001, 5, 3, 0, true);
  run_case<T, 512>(rng, 151936, 5, 0, 0, true);
  run_case<T, 512>(rng, 151936, 2, 0, 1, false);
  grid_case<T, 32>(rng, 4633, 3, 4, 0);
  grid_case<T, 32>(rng, 37, 2, 5, 1);
  grid_case<T, 512>(rng, 40001, 2, 2, 3);
  for (int v : {1, 9, 37, 4633}) dead_rows_case<T, 32>(v);
  dead_rows_case<T, 256>(12345);
  nan_case<T>();
}

// ---------------------------------------------------------------------------------------------------------------
// FSQ row code (csrc/fsq.cu) against float64 math, with the per-dimension constants computed as torch computes them
// in float32 (rlvrw.reference.fsq.fsq_constants).

struct FsqDim {
  int level;
  float half_l, offset, shift, half_width;
};

FsqDim fsq_dim(int level) {
  FsqDim d;
  d.level = level;
  d.half_l = static_cast<float>(level - 1) * static_cast<float>(1 + 1e-3) / 2.f;
  d.offset = level % 2 == 0 ? 0.5f : 0.f;
  d.shift = atanhf(d.offset / d.half_l);
  d.half_width = static_cast<float>(level / 2);
  return d;
}

void fsq_level_set(const std::vector<int>& levels, std::mt19937& rng) {
  const int d = static_cast<int>(levels.size());
  std::vector<FsqDim> dims;
  std::vector<int32_t> basis;
  int64_t size = 1;
  for (int level : levels) {
    dims.push_back(fsq_dim(level));
    basis.push_back(static_cast<int32_t>(size));
    size *= level;
  }
  std::string name = "levels";
  for (int level : levels) name += " " + std::to_string(level);

  // Every code: z at the centre of its rounding cell quantizes to it; its code maps back to its index.
  int wrong_quantize = 0, wrong_round_trip = 0;
  for (int64_t index = 0; index < size; ++index) {
    RowIndex from_z, from_code;
    for (int k = 0; k < d; ++k) {
      const FsqDim& c = dims[k];
      const int64_t level_index = (index / basis[k]) % c.level;
      const double level = static_cast<double>(level_index) - c.half_width;
      const double z = std::atanh((level + c.offset) / c.half_l) - c.shift;
      const float q = fsq_level(static_cast<float>(z), c.half_l, c.offset, c.shift);
      from_z.add(q + c.half_width, c.level, basis[k]);
      const float code = static_cast<float>(level_index - static_cast<int64_t>(c.half_width)) / c.half_width;
      from_code.add(rintf(code * c.half_width + c.half_width), c.level, basis[k]);
    }
    wrong_quantize += from_z.value() != index;
    wrong_round_trip += from_code.value() != index;
  }
  g_checks += 2;
  if (wrong_quantize) fail(name + ": " + std::to_string(wrong_quantize) + " cell centres quantize elsewhere");
  if (wrong_round_trip) fail(name + ": " + std::to_string(wrong_round_trip) + " codes do not map back");

  // Random z: the level matches float64 math except within float32 rounding of a boundary; the gradient matches.
  std::normal_distribution<float> normal(0.f, 2.5f);
  int wrong_level = 0, wrong_grad = 0;
  for (int i = 0; i < 20000; ++i) {
    const int k = i % d;
    const FsqDim& c = dims[k];
    const float z = normal(rng);
    const double bound = std::tanh(static_cast<double>(z) + c.shift) * c.half_l - c.offset;
    const double frac = bound - std::floor(bound);
    const float level = fsq_level(z, c.half_l, c.offset, c.shift);
    if (std::fabs(frac - 0.5) > 1e-5 && level != static_cast<float>(std::nearbyint(bound))) ++wrong_level;
    const double t = std::tanh(static_cast<double>(z) + c.shift);
    const double grad = 0.7 / c.half_width * c.half_l * (1 - t * t);
    if (std::fabs(fsq_grad(0.7f, z, c.half_l, c.shift, c.half_width) - grad) > 1e-6 * (1 + std::fabs(grad))) {
      ++wrong_grad;
    }
  }
  g_checks += 2;
  if (wrong_level) fail(name + ": " + std::to_string(wrong_level) + " random z round differently from float64");
  if (wrong_grad) fail(name + ": " + std::to_string(wrong_grad) + " straight-through gradients off");
}

void fsq_cases(std::mt19937& rng) {
  const std::vector<std::vector<int>> level_sets = {
      {7, 5, 5, 5, 5}, {8, 6, 5}, {8, 5, 5, 5}, {8, 8, 8, 6, 5}, {8, 8, 8, 5, 5, 5}, {2, 3}, {4}};
  for (const auto& levels : level_sets) fsq_level_set(levels, rng);

  // Outside the domain: NaN z, and level indices below 0 or at L, give index -1.
  const FsqDim c = fsq_dim(8);
  RowIndex nan_row;
  nan_row.add(fsq_level(NAN, c.half_l, c.offset, c.shift) + c.half_width, 8, 1);
  RowIndex low, high;
  low.add(-1.f, 8, 1);
  high.add(3.f, 8, 1);
  high.add(5.f, 5, 8);
  g_checks += 3;
  if (nan_row.value() != -1) fail("FSQ NaN z must give index -1");
  if (low.value() != -1) fail("FSQ level index -1 must give index -1");
  if (high.value() != -1) fail("FSQ level index L must give index -1");

  // Strided rows: (b, s) of a channel-first (B, d, S) tensor read as (B, S, d).
  const Strides3 channel_first{5 * 7, 1, 7};
  g_checks += 1;
  if (row_offset(7 * 1 + 3, 7, channel_first) != 35 + 3) fail("FSQ row_offset of a channel-first view");

  // Gather copy units follow the row size and both addresses.
  alignas(16) static unsigned char buf[256];
  g_checks += 3;
  if (gather_unit(buf, buf + 32, 128) != 16) fail("gather_unit aligned");
  if (gather_unit(buf, buf + 32, 10) != 2) fail("gather_unit 10-byte rows");
  if (gather_unit(buf + 4, buf, 64) != 4) fail("gather_unit 4-byte aligned table");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  run_dtype<float>(rng);
  run_dtype<__nv_bfloat16>(rng);
  run_dtype<__half>(rng);

  // Shape choice and 0-width rows.
  ++g_checks;
  if (choose_shape(4633) != Shape::kWarpPerRow || choose_shape(8193) != Shape::kBlock256 ||
      choose_shape(151936) != Shape::kBlock512) {
    fail("choose_shape");
  }
  {
    float logp = 0, lse = 0, ent = 1;
    const int64_t tok = 0;
    emulate_forward<float, 32>(nullptr, 1, 0, RowLayout{1, 0, 0}, &tok, 1.f, &logp, &lse, &ent);
    ++g_checks;
    if (!(lse == -INFINITY && logp == -INFINITY && ent == 0.f)) fail("vocab 0 row");
  }
  // A row stored one byte off its element alignment (never from torch) must take the scalar path.
  {
    Buffer b(64 * sizeof(float) + 16);
    float* x = reinterpret_cast<float*>(b.bytes() + 2);
    ++g_checks;
    if (vec_head<float>(x, 40) != 40) fail("vec_head of a misaligned row");
  }

  fsq_cases(rng);

  std::printf("host emulation: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
