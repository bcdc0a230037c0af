#include "common.h"

namespace diffkern {

at::Tensor heun_step_cuda(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& x_proposal,
                          const at::Tensor& denoised_proposal, const std::optional<at::Tensor>& sigma_t,
                          const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next,
                          int64_t prediction_type) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto io = validate::operands({{&x, "x"}, {&denoised, "denoised"}, {&x_proposal, "x_proposal"},
                                      {&denoised_proposal, "denoised_proposal"}},
                                     std::nullopt, false, std::nullopt);
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const HeunOp op = heun_op(lv, sigma_t, sigma_next_t, sigma, sigma_next, prediction_type);
  auto s = cuda_binding::prepare_sampler({io.input(0), io.input(1), io.input(2), io.input(3)}, std::nullopt, false,
                                         lv.shape(), false, io.dtype);
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_heun_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return cuda_binding::in_x_format(s.out, x);
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("heun_step", &heun_step_cuda); }

}  // namespace diffkern
