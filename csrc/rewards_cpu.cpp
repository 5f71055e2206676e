// KL-shaped rewards on the CPU: a backward scan finds each row's last valid token (it stops at the first one
// it meets), one pass writes kl and -kl_coef * kl, and the score is added at the last valid token. float32
// rows run 8 lanes at a time under AVX2 (the estimator chosen once per row, the mask applied as bits, k3's
// exp vectorised), with non-temporal stores from the first 32-byte aligned position: one read of logprobs,
// ref and mask, one write of each output, no read of the outputs' lines. Into fresh outputs, or the caller's
// (shape_rewards_out).
#include <ATen/Parallel.h>

#include <cstdint>

#include "ops.h"
#include "simd_cpu.h"

namespace rlhf_engine {

template <typename T>
static void shape_row(T score, const T* __restrict__ lp, const T* __restrict__ ref, const uint8_t* __restrict__ m,
                      T* __restrict__ rew, T* __restrict__ kl, int64_t len, T coef, int64_t est) {
  int64_t last = -1;
  for (int64_t t = len - 1; t >= 0; --t) {
    if (m[t]) { last = t; break; }
  }
  for (int64_t t = 0; t < len; ++t) {
    const T k = m[t] ? kl_estimate<T>(lp[t] - ref[t], est) : T(0);
    kl[t] = k;
    rew[t] = -coef * k;
  }
  if (last >= 0) rew[last] += score;
}

#ifdef __AVX2__
// 8 lanes of the mask (bytes, nonzero = valid) as float bit masks.
inline __m256 mask8(const uint8_t* m) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
}

template <int64_t Est>
inline __m256 estimate8(__m256 d) {
  if constexpr (Est == 1) return d;
  else if constexpr (Est == 2) return _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_mul_ps(d, d));
  else return k3_8(d);
}

// The vector body from t0 (where rew + t0 and kl + t0 are 32-byte aligned when Stream) to the last full 8.
// Stream: non-temporal stores (outputs far larger than the caches, written once: no read for ownership).
template <int64_t Est, bool Stream>
static int64_t shape_row_avx2(const float* __restrict__ lp, const float* __restrict__ ref,
                              const uint8_t* __restrict__ m, float* __restrict__ rew, float* __restrict__ kl,
                              int64_t t0, int64_t len, float coef) {
  const __m256 vcoef = _mm256_set1_ps(-coef);
  int64_t t = t0;
  for (; t + 8 <= len; t += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(lp + t), _mm256_loadu_ps(ref + t));
    const __m256 valid = mask8(m + t);
    __m256 k = _mm256_and_ps(estimate8<Est>(d), valid);  // 0 where masked, whatever lp and ref hold there
    if constexpr (Est == 3) {  // |d| >= 80 or NaN: exp8 saturates there; redo those lanes exactly
      const __m256 ad = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), d);
      const int far = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(ad, _mm256_set1_ps(80.0f), _CMP_NLT_UQ), valid));
      if (far) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, k);
        for (int i = 0; i < 8; ++i) {
          if (far >> i & 1) lanes[i] = kl_estimate<float>(lp[t + i] - ref[t + i], Est);
        }
        k = _mm256_load_ps(lanes);
      }
    }
    if constexpr (Stream) {
      _mm256_stream_ps(kl + t, k);
      _mm256_stream_ps(rew + t, _mm256_mul_ps(vcoef, k));
    } else {
      _mm256_storeu_ps(kl + t, k);
      _mm256_storeu_ps(rew + t, _mm256_mul_ps(vcoef, k));
    }
  }
  return t;
}

template <int64_t Est>
static int64_t shape_row_avx2(const float* lp, const float* ref, const uint8_t* m, float* rew, float* kl,
                              int64_t len, float coef) {
  const auto misalign = [](const float* p) { return reinterpret_cast<uintptr_t>(p) & 31; };
  if (len < 64 || misalign(rew) != misalign(kl)) return shape_row_avx2<Est, false>(lp, ref, m, rew, kl, 0, len, coef);
  int64_t t0 = 0;
  while (misalign(rew + t0)) ++t0;
  shape_row<float>(0.0f, lp, ref, m, rew, kl, t0, coef, Est);  // the scalar start (its score added is 0)
  const int64_t t = shape_row_avx2<Est, true>(lp, ref, m, rew, kl, t0, len, coef);
  _mm_sfence();  // the streamed stores land before the score is added at the last valid token
  return t;
}
#endif

// One float32 row: the vector body, then the scalar tail (and the whole row without AVX2).
static void shape_row_f32(float score, const float* lp, const float* ref, const uint8_t* m, float* rew, float* kl,
                          int64_t len, float coef, int64_t est) {
  int64_t t = 0;
#ifdef __AVX2__
  t = est == 1 ? shape_row_avx2<1>(lp, ref, m, rew, kl, len, coef)
      : est == 2 ? shape_row_avx2<2>(lp, ref, m, rew, kl, len, coef)
                 : shape_row_avx2<3>(lp, ref, m, rew, kl, len, coef);
#endif
  shape_row<float>(0.0f, lp + t, ref + t, m + t, rew + t, kl + t, len - t, coef, est);
  for (int64_t i = len - 1; i >= 0; --i) {
    if (m[i]) { rew[i] += score; break; }
  }
}

// Rows run in parallel; each is its own restrict-qualified call (pointers captured by value: a lambda that
// captures them by reference hides the no-alias facts from the compiler, which was 4x slower for GAE).
template <typename T>
static void shape_rows(const T* s, const T* lp, const T* ref, const uint8_t* m, T* rew, T* kl, int64_t rows,
                       int64_t len, T coef, int64_t est) {
  at::parallel_for(0, rows, 8, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * len;
      if constexpr (std::is_same_v<T, float>) {
        shape_row_f32(s[b], lp + o, ref + o, m + o, rew + o, kl + o, len, coef, est);
      } else {
        shape_row<T>(s[b], lp + o, ref + o, m + o, rew + o, kl + o, len, coef, est);
      }
    }
  });
}

// Writes into rew and kl ([B, T] contiguous, the compute dtype): shared by the allocating op and the out= op.
static void shape_rewards_into(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                               const at::Tensor& mask, double kl_coef, int64_t estimator, at::Tensor& rew,
                               at::Tensor& kl) {
  const auto dtype = rew.scalar_type();
  auto lp = logprobs.to(dtype).contiguous(), ref = ref_logprobs.to(dtype).contiguous();
  auto s = scores.to(dtype).contiguous();
  auto m = (mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask.ne(0).view(at::kByte)).contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "shape_rewards_cpu", [&] {
    shape_rows<scalar_t>(s.data_ptr<scalar_t>(), lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
                         m.data_ptr<uint8_t>(), rew.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>(), lp.size(0),
                         lp.size(1), scalar_t(kl_coef), estimator);
  });
}

std::tuple<at::Tensor, at::Tensor> shape_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                                     const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                     double kl_coef, int64_t estimator) {
  check_shape_rewards_inputs(scores, logprobs, ref_logprobs, mask, estimator);
  const auto dtype = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rew = at::empty(logprobs.sizes(), logprobs.options().dtype(dtype)), kl = at::empty_like(rew);
  shape_rewards_into(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, rew, kl);
  return {rew, kl};
}

void shape_rewards_out_cpu(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                           const at::Tensor& mask, double kl_coef, int64_t estimator, at::Tensor rewards,
                           at::Tensor kl) {
  check_shape_rewards_inputs(scores, logprobs, ref_logprobs, mask, estimator);
  const auto dtype = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&rewards, &kl}) {
    check_rows(*t, "out", logprobs);
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), "out tensors must be contiguous ", dtype);
  }
  shape_rewards_into(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, rewards, kl);
}

}  // namespace rlhf_engine
