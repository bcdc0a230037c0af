#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> lcm_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                 const at::Tensor& t, const at::Tensor& t_prev,
                                                 const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                 double sigma_data, int64_t prediction_type, double clip_sample,
                                                 bool renoise, const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Generator>& generator, int64_t seed,
                                                 int64_t offset, bool return_denoised, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x.device());
  // the noise promotes also where no sample re-noises (the dtype never depends on values)
  const auto io = validate::operands({{&x, "x"}, {&model_output, "model_output"}}, noise, true, generator);
  const validate::Timesteps ts = validate::timesteps(x, alphas_cumprod, t, t_prev, prediction_type);
  LevelSet lv(x, {{&ts.t, "t"}, {&*ts.t_prev, "t_prev"}});
  const LcmOp op = lcm_op(lv, alphas_cumprod, ts.t, *ts.t_prev, timestep_scaling, sigma_data, prediction_type,
                          clip_sample, renoise);
  auto s = cuda_binding::prepare_sampler({io.input(0), io.input(1)}, renoise ? io.noise : std::nullopt, renoise,
                                         lv.shape(), return_denoised, io.dtype);
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
  const LcmBackwardOp op{lcm_op(lv, alphas_cumprod, t, t_prev, timestep_scaling, sigma_data, prediction_type,
                                clip_sample, false)};
  // the forward's operands in its promoted dtype (autograd casts each gradient to its input's)
  const auto io = validate::operands({{&x, "x"}, {&model_output, "model_output"}}, std::nullopt, false, std::nullopt);
  const at::Tensor g = grad.to(io.dtype);
  const std::optional<at::Tensor> gd =
      grad_denoised.has_value() ? std::optional<at::Tensor>(grad_denoised->to(io.dtype)) : std::nullopt;
  auto s = cuda_binding::prepare_sampler({&g, io.input(0), io.input(1), gd.has_value() ? &*gd : nullptr}, std::nullopt, false,
                                         lv.shape(), true, io.dtype);
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
