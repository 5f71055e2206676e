// GAE on CUDA: one warp per row. The recursion is an affine map per position on the carried state
// (A, V) (see kernels/triton_kernels/gae.py); each lane composes the maps of ITEMS consecutive positions,
// a warp-shuffle suffix scan composes the lanes, then every lane replays its positions with the right
// incoming state. Rows longer than 32 * ITEMS are walked chunk by chunk from the end, carrying (A, V).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace rlhf_engine {
namespace {

constexpr int ITEMS = 16;
constexpr int WARPS = 4;

struct Map {  // x -> [[a, c], [0, d]] x + [b, e]
  float a, c, d, b, e;
};

__device__ __forceinline__ Map identity() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }

// f o g: apply g (later in time) first, then f.
__device__ __forceinline__ Map compose(const Map& f, const Map& g) {
  return {f.a * g.a, f.a * g.c + f.c * g.d, f.d * g.d, f.a * g.b + f.c * g.e + f.b, f.d * g.e + f.e};
}

__device__ __forceinline__ Map shfl_down(const Map& x, int delta) {
  return {__shfl_down_sync(0xffffffff, x.a, delta), __shfl_down_sync(0xffffffff, x.c, delta),
          __shfl_down_sync(0xffffffff, x.d, delta), __shfl_down_sync(0xffffffff, x.b, delta),
          __shfl_down_sync(0xffffffff, x.e, delta)};
}

template <typename T>
__global__ void gae_kernel(const T* __restrict__ r, const T* __restrict__ v, const uint8_t* __restrict__ m,
                           T* __restrict__ adv, T* __restrict__ ret, int64_t rows, int64_t len, float gamma,
                           float gl) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t o = row * len;
  float carry_a = 0.f, carry_v = 0.f;
  constexpr int CHUNK = 32 * ITEMS;
  for (int64_t end = len; end > 0; end -= CHUNK) {
    const int64_t start = end - CHUNK;  // may be negative for the first chunk of the row
    const int64_t t0 = start + int64_t(lane) * ITEMS;
    float rv[ITEMS], vv[ITEMS];
    bool mv[ITEMS];
    Map own = identity();
#pragma unroll
    for (int i = ITEMS - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const bool in = t >= 0 && t < end;
      mv[i] = in && m[o + t];
      rv[i] = in ? float(r[o + t]) : 0.f;
      vv[i] = in ? float(v[o + t]) : 0.f;
      const Map f = mv[i] ? Map{gl, gamma, 0.f, rv[i] - vv[i], vv[i]} : identity();
      own = compose(f, own);
    }
    // Inclusive suffix scan over lanes: incl_l = own_l o own_{l+1} o ... o own_31.
    Map incl = own;
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const Map later = shfl_down(incl, delta);
      if (lane + delta < 32) incl = compose(incl, later);
    }
    Map excl = shfl_down(incl, 1);
    if (lane == 31) excl = identity();
    // State entering this lane's last position from later positions.
    float a_next = excl.a * carry_a + excl.c * carry_v + excl.b;
    float v_next = excl.d * carry_v + excl.e;
#pragma unroll
    for (int i = ITEMS - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      if (mv[i]) {
        a_next = rv[i] + gamma * v_next - vv[i] + gl * a_next;
        v_next = vv[i];
      }
      if (t >= 0 && t < end) {
        adv[o + t] = T(mv[i] ? a_next : 0.f);
        ret[o + t] = T(mv[i] ? a_next + v_next : 0.f);
      }
    }
    const Map whole = {__shfl_sync(0xffffffff, incl.a, 0), __shfl_sync(0xffffffff, incl.c, 0),
                       __shfl_sync(0xffffffff, incl.d, 0), __shfl_sync(0xffffffff, incl.b, 0),
                       __shfl_sync(0xffffffff, incl.e, 0)};
    const float a_new = whole.a * carry_a + whole.c * carry_v + whole.b;
    carry_v = whole.d * carry_v + whole.e;
    carry_a = a_new;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae_inputs(rewards, values, mask);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous(), v = values.contiguous();
  auto m = (mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask.ne(0).view(at::kByte)).contiguous();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  const int64_t rows = r.size(0), len = r.size(1);
  if (rows == 0 || len == 0) return {adv, ret};
  const dim3 grid((rows + WARPS - 1) / WARPS), block(32 * WARPS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "gae_cuda", [&] {
    gae_kernel<scalar_t><<<grid, block, 0, stream>>>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                                     m.data_ptr<uint8_t>(), adv.data_ptr<scalar_t>(),
                                                     ret.data_ptr<scalar_t>(), rows, len, float(gamma),
                                                     float(gamma * lam));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace rlhf_engine
