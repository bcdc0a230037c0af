#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor heun_step_cpu(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& x_proposal,
                         const at::Tensor& denoised_proposal, const std::optional<at::Tensor>& sigma_t,
                         const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next,
                         int64_t prediction_type) {
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const HeunOp op{lv.scalar(sigma_t, sigma, "sigma"), lv.scalar(sigma_next_t, sigma_next, "sigma_next"),
                  int(prediction_type)};
  return cpu::run_sampler(op, {&x, &denoised, &x_proposal, &denoised_proposal}, std::nullopt, false, PhiloxKey{0, 0},
                          lv.shape(), false)
      .first;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("heun_step", &heun_step_cpu); }

}  // namespace diffkern
