#include "common.h"

namespace diffkern {

at::Tensor langevin_step_cuda(const at::Tensor& x, const at::Tensor& score, double step_size,
                              const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                              int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto s = cuda_binding::prepare_step(x, &score, noise, true, false, false);
  if (s.launch.draw) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  cuda::launch_langevin_step(s.launch, LangevinOp{step_size}, c10::cuda::getCurrentCUDAStream());
  cuda_binding::check_launch("langevin_step");
  return s.out;
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("langevin_step", &langevin_step_cuda); }

}  // namespace diffkern
