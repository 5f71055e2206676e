// Group advantages on the CPU (GRPO, Dr. GRPO, RLOO): groups of n prompt-major scores in parallel, each
// reduced in double. Mirrors kernels/reference.py group_advantages and the Triton kernel.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"

namespace rlhf_engine {

template <typename T, typename O>
static void group_rows(const T* s, O* out, int64_t groups, int64_t n, int64_t mode, double eps) {
  at::parallel_for(0, groups, 256, [=](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const T* x = s + g * n;
      O* y = out + g * n;
      double mean = 0;
      for (int64_t i = 0; i < n; ++i) mean += double(x[i]);
      mean /= double(n);
      double scale = 1.0;
      if (mode == 2) {  // rloo: s - mean of the others = n / (n - 1) (s - mean)
        scale = double(n) / double(n - 1);
      } else if (mode == 0) {  // grpo: / (std + eps), Bessel-corrected; equal scores with eps = 0 give 0
        double ss = 0;
        for (int64_t i = 0; i < n; ++i) ss += (double(x[i]) - mean) * (double(x[i]) - mean);
        const double den = std::sqrt(ss / double(n - 1)) + eps;
        scale = den == 0 ? 0.0 : 1.0 / den;  // a non-finite score: NaN through the group, never hidden
      }
      for (int64_t i = 0; i < n; ++i) y[i] = O((double(x[i]) - mean) * scale);
    }
  });
}

at::Tensor group_advantages_cpu(const at::Tensor& scores, int64_t n, int64_t mode, double eps) {
  TORCH_CHECK(scores.dim() == 1 && n >= 2 && scores.size(0) % n == 0, "scores must be [prompts * n], n >= 2");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (grpo), 1 (drgrpo) or 2 (rloo)");
  auto s = scores.contiguous();
  const auto out_type = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty(s.sizes(), s.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "group_advantages_cpu", [&] {
    if (out_type == at::kDouble) {
      group_rows<scalar_t, double>(s.data_ptr<scalar_t>(), out.data_ptr<double>(), s.size(0) / n, n, mode, eps);
    } else {
      group_rows<scalar_t, float>(s.data_ptr<scalar_t>(), out.data_ptr<float>(), s.size(0) / n, n, mode, eps);
    }
  });
  return out;
}

}  // namespace rlhf_engine
