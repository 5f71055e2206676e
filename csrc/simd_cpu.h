// AVX2 math on 8 float lanes shared by the CPU kernels: exp (token log-probs) and the k3 KL estimate
// (shaped rewards). Only compiled where the build targets AVX2 (setup.py adds -march=native when it can).
#pragma once

#ifdef __AVX2__
#include <immintrin.h>

namespace rlhf_engine {

constexpr float kExpUnderflow = -87.33654f;  // exp of anything below is 0 in float32 (denormals aside)

// exp of 8 floats (Cephes' range reduction and polynomial, ~1 ulp); 0 below the underflow point, NaN kept.
inline __m256 exp8(__m256 x) {
  const __m256 below = _mm256_cmp_ps(x, _mm256_set1_ps(kExpUnderflow), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // NaN stays NaN (min returns its 2nd operand)
  x = _mm256_max_ps(_mm256_set1_ps(kExpUnderflow), x);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
  return _mm256_andnot_ps(below, y);
}

// 2^t of 8 floats for t <= 0 (log-probabilities in base 2): t = n + f with n = round(t), 2^f by a degree-5
// polynomial on [-1/2, 1/2] (relative error < 3.5e-7, float rounding included), 2^n put into the exponent.
// t below -125 (and -inf) gives 2^-125 at most rather than 0: below any float sum's resolution, and no
// NaN from -inf * 0; callers that need exact zeros mask them. NaN stays NaN.
inline __m256 exp2_nonpos8(__m256 t) {
  t = _mm256_max_ps(_mm256_set1_ps(-125.0f), t);  // max(c, NaN) is NaN: the second operand wins
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.2915669940e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6685308963e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5516887456e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022264779e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314646721e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr double kLn2 = 0.693147180559945309;

// k3(d) = expm1(-d) + d, the KL estimate of a log-ratio d = logp - ref_logp, for 8 floats. For |d| < 0.5
// its Taylor series to d^8 (error < 2e-9 relative): exp(-d) - 1 would lose the small value to cancellation.
// Beyond, exp8(-d) - 1 + d. Lanes with |d| >= 80 or NaN are the caller's to redo (exp8 saturates near 88).
inline __m256 k3_8(__m256 d) {
  const __m256 ad = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), d);
  __m256 p = _mm256_set1_ps(1.0f / 40320.0f);
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(-1.0f / 5040.0f));
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(-1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(-1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, d, _mm256_set1_ps(0.5f));
  const __m256 series = _mm256_mul_ps(_mm256_mul_ps(d, d), p);
  const __m256 direct = _mm256_add_ps(_mm256_sub_ps(exp8(_mm256_sub_ps(_mm256_setzero_ps(), d)),
                                                    _mm256_set1_ps(1.0f)), d);
  return _mm256_blendv_ps(direct, series, _mm256_cmp_ps(ad, _mm256_set1_ps(0.5f), _CMP_LT_OQ));
}

}  // namespace rlhf_engine
#endif
