// KL-shaped rewards on CUDA: one block per row; a block-wide max finds the last valid token, then the
// row is streamed once more (from L2) writing kl and rewards. Mirrors rewards_cpu.cpp and the Triton kernel:
// the math and the outputs are float32 (float64 for float64 inputs) whatever the log-probs' dtype, and the
// RM score stays in that type too (it was once rounded to the log-probs' bfloat16).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "ops.h"

namespace rlhf_engine {
namespace {

constexpr int THREADS = 256;

struct MaxOp {  // cub::Max is gone in CCCL 3 (CUDA 13); this works with every version
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

template <typename A>
__device__ __forceinline__ A estimate(A r, int est) {
  if (est == 1) return r;
  if (est == 2) return A(0.5) * r * r;
  return ::expm1(-r) + r;
}

// T: the log-probs' dtype; A: the math and output type (float, or double for double inputs).
template <typename T, typename A>
__global__ void shape_kernel(const A* __restrict__ s, const T* __restrict__ lp, const T* __restrict__ ref,
                             const uint8_t* __restrict__ m, A* __restrict__ rew, A* __restrict__ kl,
                             int64_t len, A coef, int est) {
  using Reduce = cub::BlockReduce<int64_t, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ int64_t last_shared;
  const int64_t o = int64_t(blockIdx.x) * len;
  int64_t last = -1;
  for (int64_t t = threadIdx.x; t < len; t += THREADS) {
    if (m[o + t]) last = t;
  }
  last = Reduce(tmp).Reduce(last, MaxOp());
  if (threadIdx.x == 0) last_shared = last;
  __syncthreads();
  last = last_shared;
  const A score = s[blockIdx.x];
  for (int64_t t = threadIdx.x; t < len; t += THREADS) {
    const A k = m[o + t] ? estimate<A>(A(lp[o + t]) - A(ref[o + t]), est) : A(0);
    kl[o + t] = k;
    rew[o + t] = -coef * k + (t == last ? score : A(0));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> shape_rewards_cuda(const at::Tensor& scores, const at::Tensor& logprobs,
                                                      const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                      double kl_coef, int64_t estimator) {
  check_shape_rewards_inputs(scores, logprobs, ref_logprobs, mask, estimator);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const auto acc = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lp = logprobs.contiguous(), ref = ref_logprobs.to(logprobs.scalar_type()).contiguous();
  auto s = scores.to(acc).contiguous();
  auto m = (mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask.ne(0).view(at::kByte)).contiguous();
  auto rew = at::empty(lp.sizes(), lp.options().dtype(acc)), kl = at::empty_like(rew);
  if (lp.numel() == 0) return {rew, kl};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "shape_rewards_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    shape_kernel<scalar_t, acc_t><<<lp.size(0), THREADS, 0, stream>>>(
        s.data_ptr<acc_t>(), lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), m.data_ptr<uint8_t>(),
        rew.data_ptr<acc_t>(), kl.data_ptr<acc_t>(), lp.size(1), acc_t(kl_coef), int(estimator));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rew, kl};
}

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) { m.impl("shape_rewards", &shape_rewards_cuda); }

}  // namespace rlhf_engine
