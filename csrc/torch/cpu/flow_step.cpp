#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor flow_step_cpu(const at::Tensor& x, const at::Tensor& velocity, const std::optional<at::Tensor>& sigma_t,
                         const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next,
                         bool stochastic, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const FlowOp op{lv.scalar(sigma_t, sigma, "sigma"), lv.scalar(sigma_next_t, sigma_next, "sigma_next"),
                  stochastic};
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  return cpu::run_sampler(op, {&x, &velocity}, stochastic ? noise : std::nullopt, stochastic,
                          PhiloxKey{as_u64(seed), as_u64(offset)}, lv.shape(), false, kd.args)
      .first;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("flow_step", &flow_step_cpu); }

}  // namespace diffkern
