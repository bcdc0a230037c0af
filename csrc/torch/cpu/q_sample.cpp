#include "../cpu_generator.h"
#include "../validate.h"
#include "elementwise.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                const at::Tensor& alphas_cumprod,
                                                const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Generator>& generator, int64_t seed,
                                                int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const validate::Step s = validate::step(x0, "x0", nullptr, nullptr, noise, true, generator, &alphas_cumprod, &t,
                                          nullptr, -1);
  // With noise given, the caller already holds it: an empty second output saves a copy
  // (a custom op may not return an alias of its input).
  const auto none = [&] { return at::empty({0}, x0.options().dtype(s.dtype)); };
  // keyed before anything returns: the generator advances as on the reference path
  const Keyed kd = keyed_args(seeds, step_t, step, x0, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && !s.noise.has_value());
  if (s.empty) return {validate::empty_result(s, x0), noise.has_value() ? none() : validate::empty_result(s, x0)};
  const QSampleOp op{timestep_args(alphas_cumprod, s.ts.t, std::nullopt)};
  at::Tensor noise_out;
  at::Tensor xt = cpu::run_step(op, s.x, nullptr, s.noise, true, key, s.ts.t.sizes(), s.dtype, &noise_out, kd.args);
  return {validate::in_format(xt, s.format),
          noise.has_value() ? none() : validate::in_format(noise_out, s.format)};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace diffkern
