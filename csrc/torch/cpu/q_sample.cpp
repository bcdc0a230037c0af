#include "elementwise.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                const at::Tensor& alphas_cumprod,
                                                const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Generator>& generator, int64_t seed,
                                                int64_t offset) {
  const QSampleOp op{timestep_args(alphas_cumprod, t, std::nullopt)};
  at::Tensor noise_out;
  at::Tensor xt = cpu::run_step(op, x0, nullptr, noise, true, cpu_philox_key(generator, seed, offset), t.numel() > 1,
                                &noise_out);
  // With noise given, the caller already holds it: an empty second output saves a copy
  // (a custom op may not return an alias of its input).
  return {xt, noise.has_value() ? at::empty({0}, x0.options()) : noise_out};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace diffkern
