#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> lcm_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                const at::Tensor& t, const at::Tensor& t_prev,
                                                const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                double sigma_data, int64_t prediction_type, double clip_sample,
                                                bool renoise, const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Generator>& generator, int64_t seed,
                                                int64_t offset, bool return_denoised, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  LevelSet lv(x, {{&t, "t"}, {&t_prev, "t_prev"}});
  const LcmOp op{timestep_args(alphas_cumprod, lv.timesteps(t, "t"), lv.timesteps(t_prev, "t_prev")), timestep_scaling,
                 sigma_data, int(prediction_type),
                 clip_sample > 0, clip_sample, renoise};
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  auto [out, den] = cpu::run_sampler(op, {&x, &model_output}, renoise ? noise : std::nullopt, renoise,
                                     PhiloxKey{as_u64(seed), as_u64(offset)}, lv.shape(), return_denoised, kd.args);
  return {out, return_denoised ? den : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> lcm_step_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& grad_denoised,
                                                         const at::Tensor& x, const at::Tensor& model_output,
                                                         const at::Tensor& t, const at::Tensor& t_prev,
                                                         const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                         double sigma_data, int64_t prediction_type,
                                                         double clip_sample) {
  LevelSet lv(x, {{&t, "t"}, {&t_prev, "t_prev"}});
  const LcmBackwardOp op{LcmOp{timestep_args(alphas_cumprod, lv.timesteps(t, "t"), lv.timesteps(t_prev, "t_prev")),
                               timestep_scaling, sigma_data,
                               int(prediction_type), clip_sample > 0, clip_sample, false}};
  const at::Tensor g = grad.to(x.scalar_type());
  const std::optional<at::Tensor> gd =
      grad_denoised.has_value() ? std::optional<at::Tensor>(grad_denoised->to(x.scalar_type())) : std::nullopt;
  auto [gx, gm] = cpu::run_sampler(op, {&g, &x, &model_output, gd.has_value() ? &*gd : nullptr}, std::nullopt, false,
                                   PhiloxKey{0, 0}, lv.shape(), true);
  return {gx, gm};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("lcm_step", &lcm_step_cpu);
  m.impl("lcm_step_backward", &lcm_step_backward_cpu);
}

}  // namespace diffkern
