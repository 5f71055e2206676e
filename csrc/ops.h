#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace rlhf_engine {

// Shared input checks: every backend refuses the same bad input with the argument named.
inline void check_rows(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.dim() == 2, name, " must be [B, T], got ", x.dim(), " dims");
  TORCH_CHECK(x.sizes() == like.sizes(), name, " has shape ", x.sizes(), " but expected ", like.sizes());
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but expected ", like.device());
}

inline void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask) {
  check_rows(values, "values", rewards);
  check_rows(mask, "mask", rewards);
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "rewards and values must share a dtype");
}

inline void check_shape_rewards_inputs(const at::Tensor& scores, const at::Tensor& logprobs,
                                       const at::Tensor& ref_logprobs, const at::Tensor& mask, int64_t estimator) {
  check_rows(ref_logprobs, "ref_logprobs", logprobs);
  check_rows(mask, "mask", logprobs);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == logprobs.size(0), "scores must be [B]");
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "estimator must be 1 (k1), 2 (k2) or 3 (k3)");
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam);
std::tuple<at::Tensor, at::Tensor> shape_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                                     const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                     double kl_coef, int64_t estimator);
void shape_rewards_out_cpu(const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                           const at::Tensor& mask, double kl_coef, int64_t estimator, at::Tensor rewards,
                           at::Tensor kl);

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                                                                      double inv_t, bool entropy);
at::Tensor token_logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& lse,
                                  const at::Tensor& ent, const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_ent, double inv_t);

at::Tensor group_advantages_cpu(const at::Tensor& scores, int64_t n, int64_t mode, double eps);

// KL estimators on r = logprobs - ref_logprobs: k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r. k3 in double even
// for float r: near 0, expm1(-r) and r cancel to ~r^2/2, which a float sum would keep to ~ulp(r) / r^2 only.
template <typename T>
inline T kl_estimate(T r, int64_t estimator) {
  if (estimator == 1) return r;
  if (estimator == 2) return T(0.5) * r * r;
  const double d = r;
  return T(std::expm1(-d) + d);
}

}  // namespace rlhf_engine
