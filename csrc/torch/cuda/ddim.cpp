#include "common.h"

namespace diffkern {

at::Tensor ddim_step_cuda(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
                          const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, double eta,
                          int64_t prediction_type, double clip_sample, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x.device());
  validate::nonneg(eta, "eta");
  validate::prediction_type(prediction_type);
  TORCH_CHECK_VALUE(!std::isnan(clip_sample), "clip_sample must be a number (<= 0: no clipping), got nan");
  const bool uses_noise = eta > 0;
  const validate::Step v = validate::step(x, "x", &model_output, validate::kModelOutput, noise, uses_noise, generator,
                                          &alphas_cumprod, &t, &t_prev, prediction_type);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const bool draws = !kd.on() && uses_noise && !v.noise.has_value();
  const cuda::RngArgs rng = draws ? cuda_binding::rng_from(generator, seed, offset) : cuda::RngArgs{};
  if (v.empty) return validate::empty_result(v, x);
  auto s = cuda_binding::prepare_sampler({&v.x, &v.m}, v.noise, uses_noise, v.ts.t.sizes(), false, v.dtype);
  if (draws) s.launch.rng = rng;
  s.launch.keyed = kd.args;
  const DdimOp op{timestep_args(alphas_cumprod, v.ts.t, v.ts.t_prev), eta, int(prediction_type), clip_sample > 0,
                  clip_sample};
  cuda::launch_ddim_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return validate::in_format(s.out, v.format);
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("ddim_step", &ddim_step_cuda); }

}  // namespace diffkern
