#include "sampler_common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> lcm_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                 const at::Tensor& t, const at::Tensor& t_prev,
                                                 const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                 double sigma_data, int64_t prediction_type, double clip_sample,
                                                 bool renoise, const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Generator>& generator, int64_t seed,
                                                 int64_t offset, bool return_denoised, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x.device());
  LevelSet lv(x, {{&t, "t"}, {&t_prev, "t_prev"}});
  const LcmOp op{timestep_args(alphas_cumprod, lv.timesteps(t, "t"), lv.timesteps(t_prev, "t_prev")), timestep_scaling,
                 sigma_data, int(prediction_type),
                 clip_sample > 0, clip_sample, renoise};
  auto s = cuda_binding::prepare_sampler({&x, &model_output}, renoise ? noise : std::nullopt, renoise,
                                         lv.shape(), return_denoised);
  // One draw's worth of the generator per call, also when no sample re-noises (as the
  // reference and the CPU path advance it).
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  if (!noise.has_value() && !kd.on()) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  s.launch.keyed = kd.args;
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_lcm_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return {cuda_binding::in_x_format(s.out, x),
          return_denoised ? cuda_binding::in_x_format(s.out1, x) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> lcm_step_backward_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_denoised, const at::Tensor& x,
    const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
    double timestep_scaling, double sigma_data, int64_t prediction_type, double clip_sample) {
  const c10::cuda::CUDAGuard guard(x.device());
  LevelSet lv(x, {{&t, "t"}, {&t_prev, "t_prev"}});
  const LcmBackwardOp op{LcmOp{timestep_args(alphas_cumprod, lv.timesteps(t, "t"), lv.timesteps(t_prev, "t_prev")),
                               timestep_scaling, sigma_data,
                               int(prediction_type), clip_sample > 0, clip_sample, false}};
  const at::Tensor g = grad.to(x.scalar_type());
  const std::optional<at::Tensor> gd =
      grad_denoised.has_value() ? std::optional<at::Tensor>(grad_denoised->to(x.scalar_type())) : std::nullopt;
  auto s = cuda_binding::prepare_sampler({&g, &x, &model_output, gd.has_value() ? &*gd : nullptr}, std::nullopt, false,
                                         lv.shape(), true);
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_lcm_step_backward(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return {s.out, s.out1};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("lcm_step", &lcm_step_cuda);
  m.impl("lcm_step_backward", &lcm_step_backward_cuda);
}

}  // namespace diffkern
