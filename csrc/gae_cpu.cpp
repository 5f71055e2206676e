// GAE on the CPU: the masked reverse recursion, rows in parallel (at::parallel_for), each a tight scalar
// loop over time. Masked positions pass (A_next, V_next) through and get 0; see kernels/reference.py.
#include <ATen/Parallel.h>

#include "ops.h"

namespace rlhf_engine {

// ROWS rows advance together (independent dependency chains: the CPU overlaps them), and the mask
// selects rather than branches, so ragged or holed masks cost no mispredictions.
template <typename T, int ROWS>
static inline void gae_group(const T* r, const T* v, const uint8_t* m, T* adv, T* ret, int64_t len, T gamma,
                             T gl) {
  T next_a[ROWS] = {}, next_v[ROWS] = {};
  for (int64_t t = len - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int k = 0; k < ROWS; ++k) {
      const int64_t i = k * len + t;
      const bool keep = m[i] != 0;  // selects, not products: garbage (NaN) under the mask never leaks
      const T a = r[i] + gamma * next_v[k] - v[i] + gl * next_a[k];
      next_a[k] = keep ? a : next_a[k];
      next_v[k] = keep ? v[i] : next_v[k];
      adv[i] = keep ? a : T(0);
      ret[i] = keep ? a + v[i] : T(0);
    }
  }
}

template <typename T>
static void gae_rows(const T* r, const T* v, const uint8_t* m, T* adv, T* ret, int64_t rows, int64_t len, T gamma,
                     T gl) {
  constexpr int G = 8;
  at::parallel_for(0, (rows + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g * G, o = b * len;
      if (b + G <= rows) {
        gae_group<T, G>(r + o, v + o, m + o, adv + o, ret + o, len, gamma, gl);
      } else {
        for (int64_t bb = b; bb < rows; ++bb) {
          const int64_t oo = bb * len;
          gae_group<T, 1>(r + oo, v + oo, m + oo, adv + oo, ret + oo, len, gamma, gl);
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
    gae_rows<scalar_t>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<uint8_t>(),
                                adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(), r.size(0), r.size(1),
                                scalar_t(gamma), scalar_t(gamma * lam));
  });
  return {adv, ret};
}

}  // namespace rlhf_engine
