#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                 const at::Tensor& alphas_cumprod,
                                                 const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Generator>& generator, int64_t seed,
                                                 int64_t offset) {
  const c10::cuda::CUDAGuard guard(x0.device());
  auto s = cuda_binding::prepare_step(x0, nullptr, noise, true, t.numel() > 1, true);
  if (s.launch.draw) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  const QSampleOp op{timestep_args(alphas_cumprod, t, std::nullopt)};
  cuda::launch_q_sample(s.launch, op, c10::cuda::getCurrentCUDAStream());
  cuda_binding::check_launch("q_sample");
  return {s.out, noise.has_value() ? at::empty({0}, x0.options()) : s.noise_out};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace diffkern
