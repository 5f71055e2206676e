// GAE on the CPU: the masked reverse recursion, rows in parallel (at::parallel_for), each a tight scalar
// loop over time. Masked positions pass (A_next, V_next) through and get 0; see kernels/reference.py.
#include <ATen/Parallel.h>

#include "ops.h"

namespace rlhf_engine {

// One row at a time per thread, walking back over time with selects rather than branches (ragged or
// holed masks cost no mispredictions). Each row is a restrict-qualified call with the pointers captured by
// value: capturing them by reference in the parallel_for lambda hid the no-alias facts and ran 4x slower.
template <typename T>
static void gae_row(const T* __restrict__ r, const T* __restrict__ v, const uint8_t* __restrict__ m,
                    T* __restrict__ adv, T* __restrict__ ret, int64_t len, T gamma, T gl) {
  T next_a = 0, next_v = 0;
  for (int64_t t = len - 1; t >= 0; --t) {
    const bool keep = m[t] != 0;  // selects, not products: garbage (NaN) under the mask never leaks
    const T a = r[t] + gamma * next_v - v[t] + gl * next_a;
    next_a = keep ? a : next_a;
    next_v = keep ? v[t] : next_v;
    adv[t] = keep ? a : T(0);
    ret[t] = keep ? a + v[t] : T(0);
  }
}

template <typename T>
static void gae_rows(const T* r, const T* v, const uint8_t* m, T* adv, T* ret, int64_t rows, int64_t len, T gamma,
                     T gl) {
  at::parallel_for(0, rows, 8, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * len;
      gae_row<T>(r + o, v + o, m + o, adv + o, ret + o, len, gamma, gl);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(rewards, values, mask);
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
