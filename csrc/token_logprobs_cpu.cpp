// Token log-probs (+ entropy) on the CPU, forward and backward, rows in parallel.
//
// Forward, per row of z = logits * inv_t, in one read of the row: an online log-sum-exp over blocks of 512
// (the block's max as it streams in, then s = sum exp(z - m) and, with entropy, t = sum exp(z - m) (z - m)
// from L1, rescaled when the max grows). Each block sums in float32 vector accumulators and is then added
// into double, so the log-sum-exp keeps its digits at vocabularies of 150k (a float running sum loses ~1e-5
// there). exp is 2^x by a degree-5 polynomial (3.5e-7 relative; simd_cpu.h). Outputs float32 (float64 for
// float64 logits) log-prob, log-sum-exp (kept for the backward) and entropy.
// Backward, per row: d/dz_j = inv_t * (g_lp * ([j == t] - p_j) - g_h * p_j * (log p_j + H)), written straight
// into a gradient of the logits' dtype (bfloat16 rounded to nearest even); float32 with streaming stores.
// Limits: a row holding +inf puts all its mass on its k infinite logits: log-prob -log k for those, -inf for
// the others, entropy log k; a row with a NaN gives NaN. The math matches kernels/reference.py.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
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
// float32 rows in one read: blocks of kBlock floats, each block's max taken as it streams in from memory,
// then its exp-sum from L1 against the running max (online log-sum-exp: the sums are rescaled when the max
// grows). Per block the sums run in four float32 vector accumulators (at most 16 terms of at most 1 per
// lane: error ~1e-7 relative) and are then added into double, so the log-sum-exp keeps its digits at any
// vocabulary. Scale: z = row * inv_t (skipped at temperature 1). A +inf in the row goes to the scalar path
// (its limits); a NaN makes the sums NaN, which is what the row returns.
constexpr int64_t kBlock = 512, kPrefetch = 2 * kBlock;

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline double hsum8(__m256 v) {  // the 8 lanes widened to double, then added
  const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  alignas(32) double l[4];
  _mm256_store_pd(l, d);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

template <bool Scale, bool Entropy>
RowOut row_forward_f32(const float* row, int64_t vocab, int64_t tok, float inv_t) {
  auto z = [&](int64_t j) { return Scale ? row[j] * inv_t : row[j]; };
  const __m256 vt = _mm256_set1_ps(inv_t);
  auto load = [&](int64_t j) { return Scale ? _mm256_mul_ps(_mm256_loadu_ps(row + j), vt) : _mm256_loadu_ps(row + j); };
  const int64_t body = vocab / 8 * 8;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = body; j < vocab; ++j) m = z(j) > m ? z(j) : m;  // the tail's max first
  double s = 0, t = 0;
  for (int64_t b0 = 0; b0 < body; b0 += kBlock) {
    const int64_t b1 = std::min(body, b0 + kBlock);
    __m256 vmax = _mm256_set1_ps(m);
    for (int64_t j = b0; j < b1; j += 8) vmax = _mm256_max_ps(load(j), vmax);  // a NaN lane keeps vmax
    const float bm = hmax8(vmax);
    if (bm > m) {
      if (std::isinf(bm)) return row_forward_scalar(z, vocab, tok, Entropy);  // +inf: the limits
      if (s > 0) {  // rescale what was summed against the old max
        const double c = std::exp(double(m) - double(bm));
        if (Entropy) t = c * (t + (double(m) - double(bm)) * s);
        s *= c;
      }
      m = bm;
    }
    if (std::isinf(m)) continue;  // everything so far is -inf: nothing to add
    const __m256 vm = _mm256_set1_ps(m), vlog2e = _mm256_set1_ps(kLog2e);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;
    int64_t j = b0;
    auto step = [&](int64_t k, __m256& acc, __m256& ent) {  // e = 2^t, t = (z - m) log2(e) <= 0
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(load(k), vm), vlog2e);
      const __m256 e = exp2_nonpos8(t);
      acc = _mm256_add_ps(acc, e);
      // sum e * t (times ln 2 below); t clamped as exp2_nonpos8 does, so z = -inf adds ~0, not NaN
      if (Entropy) ent = _mm256_fmadd_ps(e, _mm256_max_ps(_mm256_set1_ps(-125.0f), t), ent);
    };
    for (; j + 32 <= b1; j += 32) {
      // fetch ahead while this block computes from L1: the max pass of a later block then finds it in cache
      _mm_prefetch(reinterpret_cast<const char*>(row + j + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + j + kPrefetch + 16), _MM_HINT_T0);
      step(j, a0, e0);
      step(j + 8, a1, e1);
      step(j + 16, a2, e2);
      step(j + 24, a3, e3);
    }
    for (; j < b1; j += 8) step(j, a0, e0);
    s += hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    if (Entropy) t += kLn2 * hsum8(_mm256_add_ps(_mm256_add_ps(e0, e1), _mm256_add_ps(e2, e3)));
  }
  if (std::isinf(m) && m > 0) return row_forward_scalar(z, vocab, tok, Entropy);  // +inf in the tail
  for (int64_t j = body; j < vocab; ++j) {
    const float x = z(j) - m;
    const double e = std::exp(double(x));
    s += e;
    if (Entropy && e > 0) t += e * x;
  }
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  if (std::isnan(s) || std::isnan(m)) return {qnan, qnan, qnan};
  const double log_s = std::log(s);
  const double zt = (tok >= 0 && tok < vocab) ? double(z(tok)) : qnan;
  return {zt - m - log_s, m + log_s, log_s - t / s};
}

RowOut row_forward_f32(const float* row, int64_t vocab, int64_t tok, float inv_t, bool entropy) {
  if (inv_t == 1.0f) return entropy ? row_forward_f32<false, true>(row, vocab, tok, inv_t)
                                    : row_forward_f32<false, false>(row, vocab, tok, inv_t);
  return entropy ? row_forward_f32<true, true>(row, vocab, tok, inv_t)
                 : row_forward_f32<true, false>(row, vocab, tok, inv_t);
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

// One row's gradient into g (float), before the cast to the logits' dtype. Stream: g is the final float32
// gradient, written with non-temporal stores (a fresh tensor far larger than the caches: no read for
// ownership, nothing evicted), after a scalar start that aligns g + j to 32 bytes.
template <typename T, bool Stream>
void row_backward(const T* row, int64_t vocab, int64_t tok, double inv_t, double lse, double ent, double g_lp,
                  double g_h, bool has_h, float* g) {
  auto scalar = [&](int64_t j) {
    const double lp = double(row[j]) * inv_t - lse;
    const double p = std::exp(lp);
    double out = -g_lp * p;
    if (has_h && p > 0) out -= g_h * p * (lp + ent);
    g[j] = float(out * inv_t);
  };
  int64_t j = 0;
#ifdef __AVX2__
  if constexpr (!std::is_same_v<T, double>) {
    if (Stream) {
      for (; j < vocab && (reinterpret_cast<uintptr_t>(g + j) & 31); ++j) scalar(j);
    }
    const __m256 vt = _mm256_set1_ps(float(inv_t)), vl = _mm256_set1_ps(float(lse)), vh = _mm256_set1_ps(float(ent));
    const __m256 vglp = _mm256_set1_ps(float(g_lp)), vgh = _mm256_set1_ps(float(g_h));
    const __m256 vlog2e = _mm256_set1_ps(kLog2e), vlow = _mm256_set1_ps(-125.0f);
    const __m256 vlpmin = _mm256_set1_ps(-125.0f * float(kLn2));
    alignas(32) float in[8];
    for (; j + 8 <= vocab; j += 8) {
      __m256 x;
      if constexpr (std::is_same_v<T, float>) {
        x = _mm256_loadu_ps(row + j);
      } else {
        for (int i = 0; i < 8; ++i) in[i] = float(row[j + i]);
        x = _mm256_load_ps(in);
      }
      const __m256 lp = _mm256_fmsub_ps(x, vt, vl);  // log p_j
      const __m256 t = _mm256_mul_ps(lp, vlog2e);
      // p_j = 2^t, exactly 0 below 2^-125 (a -inf logit), NaN kept (the comparison is false for NaN)
      const __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(t, vlow, _CMP_LT_OQ), exp2_nonpos8(t));
      __m256 out = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), vglp), p);
      if (has_h) {  // p (log p + H) with log p clamped, so that p = 0 gives 0, not 0 * -inf
        out = _mm256_fnmadd_ps(vgh, _mm256_mul_ps(p, _mm256_add_ps(_mm256_max_ps(vlpmin, lp), vh)), out);
      }
      if (Stream) _mm256_stream_ps(g + j, _mm256_mul_ps(out, vt));
      else _mm256_storeu_ps(g + j, _mm256_mul_ps(out, vt));
    }
    if (Stream) _mm_sfence();  // the streamed stores land before the target token's entry is read back
  }
#endif
  for (; j < vocab; ++j) scalar(j);
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
    row_backward<T, true>(row, vocab, tok, inv_t, lse, ent, g_lp, g_h, has_h, dst);
  } else {
    buf.resize(vocab);
    row_backward<T, false>(row, vocab, tok, inv_t, lse, ent, g_lp, g_h, has_h, buf.data());
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
