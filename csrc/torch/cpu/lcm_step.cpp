#include "../cpu_generator.h"
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
  // the noise promotes also where no sample re-noises (the dtype never depends on values)
  const auto io = validate::operands({{&x, "x"}, {&model_output, "model_output"}}, noise, true, generator);
  const validate::Timesteps ts = validate::timesteps(x, alphas_cumprod, t, t_prev, prediction_type);
  LevelSet lv(x, {{&ts.t, "t"}, {&*ts.t_prev, "t_prev"}});
  const LcmOp op = lcm_op(lv, alphas_cumprod, ts.t, *ts.t_prev, timestep_scaling, sigma_data, prediction_type,
                          clip_sample, renoise);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && !noise.has_value());
  auto [out, den] = cpu::run_sampler(op, {io.input(0), io.input(1)}, renoise ? io.noise : std::nullopt, renoise,
                                     key, lv.shape(), return_denoised, kd.args, io.dtype);
  return {out, return_denoised ? den : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> lcm_step_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& grad_denoised,
                                                         const at::Tensor& x, const at::Tensor& model_output,
                                                         const at::Tensor& t, const at::Tensor& t_prev,
                                                         const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                         double sigma_data, int64_t prediction_type,
                                                         double clip_sample) {
  LevelSet lv(x, {{&t, "t"}, {&t_prev, "t_prev"}});
  const LcmBackwardOp op{lcm_op(lv, alphas_cumprod, t, t_prev, timestep_scaling, sigma_data, prediction_type,
                                clip_sample, false)};
  // the forward's operands in its promoted dtype (autograd casts each gradient to its input's)
  const auto io = validate::operands({{&x, "x"}, {&model_output, "model_output"}}, std::nullopt, false, std::nullopt);
  const at::Tensor g = grad.to(io.dtype);
  const std::optional<at::Tensor> gd =
      grad_denoised.has_value() ? std::optional<at::Tensor>(grad_denoised->to(io.dtype)) : std::nullopt;
  auto [gx, gm] = cpu::run_sampler(op, {&g, io.input(0), io.input(1), gd.has_value() ? &*gd : nullptr}, std::nullopt, false,
                                   PhiloxKey{0, 0}, lv.shape(), true, {}, io.dtype);
  return {gx, gm};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("lcm_step", &lcm_step_cpu);
  m.impl("lcm_step_backward", &lcm_step_backward_cpu);
}

}  // namespace diffkern
