#include "../cpu_generator.h"
#include "../validate.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
                         const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, double eta,
                         int64_t prediction_type, double clip_sample, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  validate::nonneg(eta, "eta");
  validate::prediction_type(prediction_type);
  TORCH_CHECK_VALUE(!std::isnan(clip_sample), "clip_sample must be a number (<= 0: no clipping), got nan");
  const bool uses_noise = eta > 0;
  const validate::Step s = validate::step(x, "x", &model_output, validate::kModelOutput, noise, uses_noise, generator,
                                          &alphas_cumprod, &t, &t_prev, prediction_type);
  // keyed before anything returns: the generator advances as on the reference path
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && uses_noise && !s.noise.has_value());
  if (s.empty) return validate::empty_result(s, x);
  const DdimOp op{timestep_args(alphas_cumprod, s.ts.t, s.ts.t_prev), eta, int(prediction_type), clip_sample > 0,
                  clip_sample};
  return validate::in_format(cpu::run_step(op, s.x, &s.m, s.noise, uses_noise, key, s.ts.t.sizes(), s.dtype, nullptr, kd.args), s.format);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("ddim_step", &ddim_step_cpu); }

}  // namespace diffkern
