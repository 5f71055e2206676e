// Token log-probs (+ entropy) on the CPU, forward and backward, rows in parallel.
//
// Forward, per row of z = logits * inv_t: one pass for the max (and whether a NaN is present), one pass
// (from cache: a row is at most a few hundred KiB) for s = sum exp(z - m) and, with entropy,
// t = sum exp(z - m) (z - m); every exp is added into double accumulators, so the log-sum-exp keeps its
// digits at vocabularies of 150k (a float running sum loses ~1e-5 there). Outputs float32 (float64 for
// float64 logits) log-prob, log-sum-exp (kept for the backward) and entropy.
// Backward, per row: d/dz_j = inv_t * (g_lp * ([j == t] - p_j) - g_h * p_j * (log p_j + H)), written straight
// into a gradient of the logits' dtype (bfloat16 rounded to nearest even).
// Limits: a row holding +inf puts all its mass on its k infinite logits: log-prob -log k for those, -inf for
// the others, entropy log k; a row with a NaN gives NaN. The math matches kernels/reference.py.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>

#include "simd_cpu.h"
#endif

#include "ops.h"

namespace rlhf_engine {
namespace {


struct RowOut {
  double logp, lse, ent;
};

// The limits of a row whose max is +inf: all the mass on its k infinite entries.
template <typename Load>
RowOut infinite_row(Load z, int64_t vocab, int64_t tok) {
  int64_t k = 0;
  for (int64_t j = 0; j < vocab; ++j) k += std::isinf(z(j)) && z(j) > 0;
  const double inf = std::numeric_limits<double>::infinity();
  const bool hit = tok >= 0 && tok < vocab && std::isinf(z(tok)) && z(tok) > 0;
  return {hit ? -std::log(double(k)) : -inf, inf, std::log(double(k))};
}

// Any dtype, scalar: the double path (float64 logits) and the fallback without AVX2.
template <typename Load>
RowOut row_forward_scalar(Load z, int64_t vocab, int64_t tok, bool entropy) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < vocab; ++j) {
    const double x = z(j);
    nan |= std::isnan(x);
    m = x > m ? x : m;
  }
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  if (nan) return {qnan, qnan, qnan};
  if (std::isinf(m) && m > 0) return infinite_row(z, vocab, tok);
  double s = 0, t = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    const double x = z(j) - m;
    const double e = std::exp(x);
    s += e;
    if (entropy && e > 0) t += e * x;
  }
  const double log_s = std::log(s);
  const double zt = (tok >= 0 && tok < vocab) ? z(tok) : qnan;
  return {zt - m - log_s, m + log_s, log_s - t / s};
}

#ifdef __AVX2__
// Double accumulators for 8 float lanes: each value is widened and added exactly as a double would be.
struct Acc8 {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  void add(__m256 v) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double total() const {
    alignas(32) double d[4];
    _mm256_store_pd(d, _mm256_add_pd(lo, hi));
    return (d[0] + d[1]) + (d[2] + d[3]);
  }
};

// float32 rows: z = row * inv_t is formed in float (as the Triton kernel does), the sums in double.
RowOut row_forward_f32(const float* row, int64_t vocab, int64_t tok, float inv_t, bool entropy) {
  auto z = [&](int64_t j) { return row[j] * inv_t; };
  const __m256 vt = _mm256_set1_ps(inv_t);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), vnan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= vocab; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(row + j), vt);
    vmax = _mm256_max_ps(vmax, x);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (; j < vocab; ++j) {
    nan |= std::isnan(z(j));
    m = z(j) > m ? z(j) : m;
  }
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  if (nan) return {qnan, qnan, qnan};
  if (std::isinf(m) && m > 0) return infinite_row(z, vocab, tok);
  const __m256 vm = _mm256_set1_ps(m);
  Acc8 vs, vt_acc;
  for (j = 0; j + 8 <= vocab; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), vt), vm);
    const __m256 e = exp8(x);
    vs.add(e);
    if (entropy) {  // e * (z - m), with 0 where e is 0 (z = -inf would make it NaN)
      const __m256 live = _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ);
      vt_acc.add(_mm256_and_ps(live, _mm256_mul_ps(e, x)));
    }
  }
  double s = vs.total(), t = vt_acc.total();
  for (; j < vocab; ++j) {
    const float x = z(j) - m;
    const double e = std::exp(double(x));
    s += e;
    if (entropy && e > 0) t += e * x;
  }
  const double log_s = std::log(s);
  const double zt = (tok >= 0 && tok < vocab) ? double(z(tok)) : qnan;
  return {zt - m - log_s, m + log_s, log_s - t / s};
}
#endif

// One row's forward, any dtype.
template <typename T>
RowOut row_forward(const T* row, int64_t vocab, int64_t tok, double inv_t, bool entropy, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, double>) {
    return row_forward_scalar([&](int64_t j) { return row[j] * inv_t; }, vocab, tok, entropy);
  } else {
#ifdef __AVX2__
    const float* f = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      f = row;
    } else {  // bfloat16 / float16: widen the row once (it stays in cache for the second pass)
      buf.resize(vocab);
      for (int64_t j = 0; j < vocab; ++j) buf[j] = float(row[j]);
      f = buf.data();
    }
    return row_forward_f32(f, vocab, tok, float(inv_t), entropy);
#else
    const float ft = float(inv_t);
    return row_forward_scalar([&](int64_t j) { return float(row[j]) * ft; }, vocab, tok, entropy);
#endif
  }
}

// One row's gradient into g (float), before the cast to the logits' dtype.
template <typename T>
void row_backward(const T* row, int64_t vocab, int64_t tok, double inv_t, double lse, double ent, double g_lp,
                  double g_h, bool has_h, float* g) {
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (!std::is_same_v<T, double>) {
    const __m256 vt = _mm256_set1_ps(float(inv_t)), vl = _mm256_set1_ps(float(lse)), vh = _mm256_set1_ps(float(ent));
    const __m256 vglp = _mm256_set1_ps(float(g_lp)), vgh = _mm256_set1_ps(float(g_h));
    alignas(32) float in[8];
    for (; j + 8 <= vocab; j += 8) {
      __m256 x;
      if constexpr (std::is_same_v<T, float>) {
        x = _mm256_loadu_ps(row + j);
      } else {
        for (int i = 0; i < 8; ++i) in[i] = float(row[j + i]);
        x = _mm256_load_ps(in);
      }
      const __m256 lp = _mm256_sub_ps(_mm256_mul_ps(x, vt), vl);
      const __m256 p = exp8(lp);
      __m256 out = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), vglp), p);
      if (has_h) {
        const __m256 live = _mm256_cmp_ps(p, _mm256_setzero_ps(), _CMP_GT_OQ);
        const __m256 term = _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_add_ps(lp, vh)));
        out = _mm256_fnmadd_ps(vgh, term, out);
      }
      _mm256_storeu_ps(g + j, _mm256_mul_ps(out, vt));
    }
  }
#endif
  for (; j < vocab; ++j) {
    const double lp = double(row[j]) * inv_t - lse;
    const double p = std::exp(lp);
    double out = -g_lp * p;
    if (has_h && p > 0) out -= g_h * p * (lp + ent);
    g[j] = float(out * inv_t);
  }
  if (tok >= 0 && tok < vocab) g[tok] += float(g_lp * inv_t);
}

// One row's gradient into dst, in the logits' dtype: float64 exactly, float32 in place, 16-bit types through
// a float buffer rounded to nearest even.
template <typename T>
void grad_row(const T* row, int64_t vocab, int64_t tok, double inv_t, double lse, double ent, double g_lp, double g_h,
              bool has_h, T* dst, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < vocab; ++j) {
      const double lp = row[j] * inv_t - lse, p = std::exp(lp);
      double v = -g_lp * p;
      if (has_h && p > 0) v -= g_h * p * (lp + ent);
      dst[j] = v * inv_t;
    }
    if (tok >= 0 && tok < vocab) dst[tok] += g_lp * inv_t;
  } else if constexpr (std::is_same_v<T, float>) {
    row_backward<T>(row, vocab, tok, inv_t, lse, ent, g_lp, g_h, has_h, dst);
  } else {
    buf.resize(vocab);
    row_backward<T>(row, vocab, tok, inv_t, lse, ent, g_lp, g_h, has_h, buf.data());
    for (int64_t j = 0; j < vocab; ++j) dst[j] = T(buf[j]);
  }
}

void check_logits(const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "logits must be a [A, B, V] view with unit stride over V");
  TORCH_CHECK(tokens.dim() == 1 && tokens.numel() == logits.size(0) * logits.size(1) &&
                  tokens.scalar_type() == at::kLong,
              "tokens must be int64 [A * B]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                                      double inv_t, bool entropy) {
  check_logits(logits, tokens);
  const int64_t inner = logits.size(1), vocab = logits.size(2), rows = logits.size(0) * inner;
  const auto out_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(out_type);
  auto logp = at::empty({rows}, opts), lse = at::empty({rows}, opts);
  auto ent = entropy ? at::empty({rows}, opts) : at::empty({0}, opts);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out_t* lp = logp.data_ptr<out_t>();
    out_t* ls = lse.data_ptr<out_t>();
    out_t* en = entropy ? ent.data_ptr<out_t>() : nullptr;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)), [=](int64_t r0, int64_t r1) {
      std::vector<float> buf;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = base + (r / inner) * s0 + (r % inner) * s1;
        const RowOut o = row_forward<scalar_t>(row, vocab, tok[r], inv_t, entropy, buf);
        lp[r] = out_t(o.logp);
        ls[r] = out_t(o.lse);
        if (en) en[r] = out_t(o.ent);
      }
    });
  });
  return {logp, lse, ent};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                                  const at::Tensor& ent, const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_ent, double inv_t) {
  check_logits(logits, tokens);
  const int64_t inner = logits.size(1), vocab = logits.size(2), rows = logits.size(0) * inner;
  auto grad = at::empty({rows, vocab}, logits.options());
  const bool has_lp = grad_logp.has_value(), has_h = grad_ent.has_value();
  auto glp = has_lp ? grad_logp->to(at::kDouble).contiguous() : at::zeros({rows}, lse.options().dtype(at::kDouble));
  auto gh = has_h ? grad_ent->to(at::kDouble).contiguous() : glp;
  auto ls = lse.to(at::kDouble).contiguous();
  auto en = has_h ? ent.to(at::kDouble).contiguous() : ls;
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const double *pglp = glp.data_ptr<double>(), *pgh = gh.data_ptr<double>(), *pls = ls.data_ptr<double>(),
               *pen = en.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)), [=](int64_t r0, int64_t r1) {
      std::vector<float> g;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = base + (r / inner) * s0 + (r % inner) * s1;
        grad_row<scalar_t>(row, vocab, tok[r], inv_t, pls[r], pen[r], pglp[r], pgh[r], has_h, out + r * vocab, g);
      }
    });
  });
  return grad;
}

}  // namespace rlhf_engine
