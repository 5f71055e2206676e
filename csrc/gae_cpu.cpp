// GAE on the CPU: the masked reverse recursion, rows in parallel (at::parallel_for), each a tight scalar
// loop over time. Masked positions pass (A_next, V_next) through and get 0; see kernels/reference.py.
#include <ATen/Parallel.h>

#include "ops.h"

namespace rlhf_engine {

template <typename T, typename M>
static void gae_rows(const T* r, const T* v, const M* m, T* adv, T* ret, int64_t rows, int64_t len, T gamma,
                     T gl) {
  at::parallel_for(0, rows, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * len;
      T next_a = 0, next_v = 0;
      for (int64_t t = len - 1; t >= 0; --t) {
        if (m[o + t]) {
          next_a = r[o + t] + gamma * next_v - v[o + t] + gl * next_a;
          next_v = v[o + t];
          adv[o + t] = next_a;
          ret[o + t] = next_a + next_v;
        } else {
          adv[o + t] = 0;
          ret[o + t] = 0;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_rows(values, "values", rewards);
  check_rows(mask, "mask", rewards);
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "rewards and values must share a dtype");
  auto r = rewards.contiguous(), v = values.contiguous();
  auto m = (mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask.ne(0).view(at::kByte)).contiguous();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "gae_cpu", [&] {
    gae_rows<scalar_t, uint8_t>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<uint8_t>(),
                                adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(), r.size(0), r.size(1),
                                scalar_t(gamma), scalar_t(gamma * lam));
  });
  return {adv, ret};
}

}  // namespace rlhf_engine
