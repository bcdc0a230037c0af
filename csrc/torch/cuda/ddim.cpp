#include "common.h"

namespace diffkern {

at::Tensor ddim_step_cuda(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
                          const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, double eta,
                          int64_t prediction_type, double clip_sample, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Generator>& generator, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool draws = eta > 0 && !noise.has_value();
  auto s = cuda_binding::prepare_step(x, &model_output, eta > 0 ? noise : std::nullopt, eta > 0, t.numel() > 1, false);
  if (draws) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  const DdimOp op{timestep_args(alphas_cumprod, t, t_prev), eta, int(prediction_type), clip_sample > 0, clip_sample};
  cuda::launch_ddim_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
  cuda_binding::check_launch("ddim_step");
  return s.out;
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("ddim_step", &ddim_step_cuda); }

}  // namespace diffkern
