#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

at::Tensor heun_step_cpu(const at::Tensor& x, const at::Tensor& denoised, const at::Tensor& x_proposal,
                         const at::Tensor& denoised_proposal, const std::optional<at::Tensor>& sigma_t,
                         const std::optional<at::Tensor>& sigma_next_t, double sigma, double sigma_next,
                         int64_t prediction_type) {
  const auto io = validate::operands({{&x, "x"}, {&denoised, "denoised"}, {&x_proposal, "x_proposal"},
                                      {&denoised_proposal, "denoised_proposal"}},
                                     std::nullopt, false, std::nullopt);
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const HeunOp op = heun_op(lv, sigma_t, sigma_next_t, sigma, sigma_next, prediction_type);
  return cpu::run_sampler(op, {io.input(0), io.input(1), io.input(2), io.input(3)}, std::nullopt, false, PhiloxKey{0, 0},
                          lv.shape(), false, {}, io.dtype)
      .first;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("heun_step", &heun_step_cpu); }

}  // namespace diffkern
