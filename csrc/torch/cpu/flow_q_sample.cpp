#include "../cpu_generator.h"
#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> flow_q_sample_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& sigma_t,
                                                     double sigma, const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Generator>& generator, int64_t seed,
                                                     int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const auto io = validate::operands({{&x0, "x0"}}, noise, true, generator);
  LevelSet lv(x0, {{&sigma_t, "sigma"}});
  const FlowQSampleOp op = flow_q_sample_op(lv, sigma_t, sigma);
  const Keyed kd = keyed_args(seeds, step_t, step, x0, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && !noise.has_value());
  auto [xt, drawn] = cpu::run_sampler(op, {io.input(0)}, io.noise, true, key,
                                      lv.shape(), false, kd.args, io.dtype);
  // With noise given, the caller already holds it (a custom op may not return an alias).
  return {xt, noise.has_value() ? at::empty({0}, x0.options()) : drawn};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("flow_q_sample", &flow_q_sample_cpu); }

}  // namespace diffkern
