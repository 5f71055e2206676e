// Schemas of the compiled ops (namespace `rlhf_engine`) and their CPU implementations' registration.
// Entry points only check inputs; the math lives in gae_cpu.cpp, rewards_cpu.cpp, token_logprobs_cpu.cpp,
// groups_cpu.cpp
// and, on CUDA, in gae.cu / rewards.cu. Python reaches them as torch.ops.rlhf_engine.* through kernels/ext.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(rlhf_engine, m) {
  // rewards, values [B, T] float32/float64; mask [B, T] bool/uint8 -> (advantages, returns) [B, T]
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // scores [B]; logprobs, ref_logprobs [B, T] float; mask [B, T]; estimator 1|2|3 -> (rewards, kl)
  m.def("shape_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef, "
        "int estimator) -> (Tensor, Tensor)");
  // the same into rewards, kl: contiguous [B, T] of the compute dtype (float32, float64 for float64 inputs)
  m.def("shape_rewards_out(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef, "
        "int estimator, Tensor(a!) rewards, Tensor(b!) kl) -> ()");
  // logits [A, B, V] (unit stride over V); tokens int64 [A*B] -> (logp, lse, entropy) [A*B] float32/float64
  m.def("token_logprobs_fwd(Tensor logits, Tensor tokens, float inv_t, bool entropy) -> (Tensor, Tensor, Tensor)");
  // -> d loss / d logits [A*B, V] in the logits' dtype
  m.def("token_logprobs_bwd(Tensor logits, Tensor tokens, Tensor lse, Tensor ent, Tensor? grad_logp, "
        "Tensor? grad_ent, float inv_t) -> Tensor");
  // scores [prompts * n] prompt-major; mode 0 grpo | 1 drgrpo | 2 rloo -> advantages [prompts * n]
  m.def("group_advantages(Tensor scores, int n, int mode, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("gae", &rlhf_engine::gae_cpu);
  m.impl("shape_rewards", &rlhf_engine::shape_rewards_cpu);
  m.impl("shape_rewards_out", &rlhf_engine::shape_rewards_out_cpu);
  m.impl("token_logprobs_fwd", &rlhf_engine::token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &rlhf_engine::token_logprobs_bwd_cpu);
  m.impl("group_advantages", &rlhf_engine::group_advantages_cpu);
}

// A Python extension module named _C, so `import kernels._C` loads the library and runs the registrations.
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
