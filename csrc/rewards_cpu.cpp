// KL-shaped rewards on the CPU: a backward scan finds each row's last valid token (it stops at the first one
// it meets), one pass writes kl and -kl_coef * kl, and the score is added at the last valid token.
#include <ATen/Parallel.h>

#include "ops.h"

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

// Rows run in parallel; each is its own restrict-qualified call (pointers captured by value: a lambda that
// captures them by reference hides the no-alias facts from the compiler, which was 4x slower for GAE).
template <typename T>
static void shape_rows(const T* s, const T* lp, const T* ref, const uint8_t* m, T* rew, T* kl, int64_t rows,
                       int64_t len, T coef, int64_t est) {
  at::parallel_for(0, rows, 8, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * len;
      shape_row<T>(s[b], lp + o, ref + o, m + o, rew + o, kl + o, len, coef, est);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> shape_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                                     const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                     double kl_coef, int64_t estimator) {
  check_shape_rewards_inputs(scores, logprobs, ref_logprobs, mask, estimator);
  const auto dtype = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lp = logprobs.to(dtype).contiguous(), ref = ref_logprobs.to(dtype).contiguous();
  auto s = scores.to(dtype).contiguous();
  auto m = (mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask.ne(0).view(at::kByte)).contiguous();
  auto rew = at::empty_like(lp), kl = at::empty_like(lp);
  AT_DISPATCH_FLOATING_TYPES(dtype, "shape_rewards_cpu", [&] {
    shape_rows<scalar_t>(s.data_ptr<scalar_t>(), lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
                         m.data_ptr<uint8_t>(), rew.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>(), lp.size(0),
                         lp.size(1), scalar_t(kl_coef), estimator);
  });
  return {rew, kl};
}

}  // namespace rlhf_engine
