#include "../cpu_generator.h"
#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor flow_step_cpu(const at::Tensor& x, const at::Tensor& velocity, const std::optional<at::Tensor>& sigma_t,
                         const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next,
                         bool stochastic, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const auto io = validate::operands({{&x, "x"}, {&velocity, "velocity"}}, noise, stochastic, generator);
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const FlowOp op = flow_op(lv, sigma_t, sigma_next_t, sigma, sigma_next, stochastic);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && stochastic && !io.noise.has_value());
  return cpu::run_sampler(op, {io.input(0), io.input(1)}, io.noise, stochastic,
                          key, lv.shape(), false, kd.args, io.dtype)
      .first;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("flow_step", &flow_step_cpu); }

}  // namespace diffkern
