#include "../cpu_generator.h"
#include "../validate.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, double step_size,
                             const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                             int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  validate::nonneg(step_size, "step_size");
  const validate::Step s = validate::step(x, "x", &score, validate::kScore, noise, true, generator, nullptr, nullptr,
                                          nullptr, -1);
  // keyed before anything returns: the generator advances as on the reference path
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && !s.noise.has_value());
  if (s.empty) return validate::empty_result(s, x);
  return validate::in_format(cpu::run_step(LangevinOp{step_size}, s.x, &s.m, s.noise, true, key, {}, s.dtype, nullptr, kd.args), s.format);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("langevin_step", &langevin_step_cpu); }

}  // namespace diffkern
