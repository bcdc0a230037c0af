#include "../cpu_generator.h"
#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor euler_step_cpu(const at::Tensor& x, const at::Tensor& model_output, const std::optional<at::Tensor>& sigma_t,
                          const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next, double eta,
                          double s_noise, double gamma, int64_t prediction_type, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Generator>& generator, int64_t seed,
                          int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const bool noisy = eta > 0 || gamma > 0;  // EulerOp::uses_noise
  const auto io = validate::operands({{&x, "x"}, {&model_output, "denoised"}}, noise, noisy, generator);
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const EulerOp op = euler_op(lv, sigma_t, sigma_next_t, sigma, sigma_next, eta, s_noise, gamma, prediction_type);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && noisy && !io.noise.has_value());
  return cpu::run_sampler(op, {io.input(0), io.input(1)}, io.noise, noisy,
                          key, lv.shape(), false, kd.args, io.dtype)
      .first;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("euler_step", &euler_step_cpu); }

}  // namespace diffkern
