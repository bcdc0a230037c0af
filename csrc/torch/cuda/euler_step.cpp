#include "common.h"

namespace diffkern {

at::Tensor euler_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                           const std::optional<at::Tensor>& sigma_t, const std::optional<at::Tensor>& sigma_next_t,
                           double sigma, double sigma_next, double eta, double s_noise, double gamma,
                           int64_t prediction_type, const std::optional<at::Tensor>& noise,
                           const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool noisy = eta > 0 || gamma > 0;  // EulerOp::uses_noise
  const auto io = validate::operands({{&x, "x"}, {&model_output, "denoised"}}, noise, noisy, generator);
  LevelSet lv(x, {{&sigma_t, "sigma"}, {&sigma_next_t, "sigma_next"}});
  const EulerOp op = euler_op(lv, sigma_t, sigma_next_t, sigma, sigma_next, eta, s_noise, gamma, prediction_type);
  auto s = cuda_binding::prepare_sampler({io.input(0), io.input(1)}, io.noise, noisy, lv.shape(),
                                         false, io.dtype);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  if (s.launch.draw && !kd.on()) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  s.launch.keyed = kd.args;
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_euler_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return cuda_binding::in_x_format(s.out, x);
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("euler_step", &euler_step_cuda); }

}  // namespace diffkern
