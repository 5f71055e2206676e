// KL-shaped rewards on the CPU: one pass per row finds the last valid token, a second writes kl and
// rewards (-kl_coef * kl, plus the score at the last valid token). Rows run in parallel.
#include <ATen/Parallel.h>

#include "ops.h"

namespace rlhf_engine {

template <typename T>
static void shape_rows(const T* s, const T* lp, const T* ref, const uint8_t* m, T* rew, T* kl, int64_t rows,
                       int64_t len, T coef, int64_t est) {
  at::parallel_for(0, rows, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * len;
      int64_t last = -1;
      for (int64_t t = len - 1; t >= 0; --t) {
        if (m[o + t]) { last = t; break; }
      }
      for (int64_t t = 0; t < len; ++t) {
        const T k = m[o + t] ? kl_estimate<T>(lp[o + t] - ref[o + t], est) : T(0);
        kl[o + t] = k;
        rew[o + t] = -coef * k + (t == last ? s[b] : T(0));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> shape_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                                     const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                     double kl_coef, int64_t estimator) {
  check_rows(ref_logprobs, "ref_logprobs", logprobs);
  check_rows(mask, "mask", logprobs);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == logprobs.size(0), "scores must be [B]");
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "estimator must be 1 (k1), 2 (k2) or 3 (k3)");
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
