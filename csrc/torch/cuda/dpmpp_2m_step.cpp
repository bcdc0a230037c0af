#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> dpmpp_2m_step_cuda(
    const at::Tensor& x, const at::Tensor& model_output, const std::optional<at::Tensor>& old_denoised,
    const std::optional<at::Tensor>& sigma_t, const std::optional<at::Tensor>& sigma_next_t,
    const std::optional<at::Tensor>& sigma_prev_t, double sigma, double sigma_next, double sigma_prev,
    int64_t prediction_type, int64_t solver_type, bool variance_preserving, bool return_denoised) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_old = old_denoised.has_value();
  const auto io = validate::operands(
      {{&x, "x"}, {&model_output, "denoised"}, {has_old ? &*old_denoised : nullptr, "old_denoised"}}, std::nullopt,
      false, std::nullopt);
  // sigma_prev matters only with old_denoised (the first step ignores it)
  const std::optional<at::Tensor> prev_t = has_old ? sigma_prev_t : std::nullopt;
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}, {&prev_t, "sigma_prev"}});
  const DpmppOp op = dpmpp_2m_op(lv, sigma_t, sigma_next_t, prev_t, sigma, sigma_next, sigma_prev, prediction_type,
                                 solver_type, variance_preserving, has_old);
  auto s = cuda_binding::prepare_sampler({io.input(0), io.input(1), io.input(2)}, std::nullopt, false,
                                         lv.shape(), return_denoised, io.dtype);
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_dpmpp_2m_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return {cuda_binding::in_x_format(s.out, x),
          return_denoised ? cuda_binding::in_x_format(s.out1, x) : at::empty({0}, x.options())};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("dpmpp_2m_step", &dpmpp_2m_step_cuda); }

}  // namespace diffkern
