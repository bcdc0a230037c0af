#include "elementwise.h"

namespace diffkern {

at::Tensor ddpm_step_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
                         const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, int64_t variance,
                         int64_t prediction_type, double clip_sample, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Generator>& generator, int64_t seed, int64_t offset) {
  const DdpmOp op{timestep_args(alphas_cumprod, t, t_prev), int(variance), int(prediction_type), clip_sample > 0,
                  clip_sample};
  return cpu::run_step(op, x, &model_output, noise, true, cpu_philox_key(generator, seed, offset), t.numel() > 1);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("ddpm_step", &ddpm_step_cpu); }

}  // namespace diffkern
