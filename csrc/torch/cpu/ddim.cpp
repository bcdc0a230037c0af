#include "elementwise.h"

namespace diffkern {

at::Tensor ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& t,
                         const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, double eta, int64_t prediction_type,
                         double clip_sample, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Generator>& generator, int64_t seed,
                         int64_t offset) {
  const DdimOp op{timestep_args(alphas_cumprod, t, t_prev), eta, int(prediction_type), clip_sample > 0, clip_sample};
  return cpu::run_step(op, x, &model_output, eta > 0 ? noise : std::nullopt, eta > 0,
                       cpu_philox_key(generator, seed, offset), t.numel() > 1);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("ddim_step", &ddim_step_cpu); }

}  // namespace diffkern
