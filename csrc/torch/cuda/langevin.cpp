#include "common.h"

namespace diffkern {

at::Tensor langevin_step_cuda(const at::Tensor& x, const at::Tensor& score, double step_size,
                              const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                              int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x.device());
  validate::nonneg(step_size, "step_size");
  const validate::Step v = validate::step(x, "x", &score, validate::kScore, noise, true, generator, nullptr, nullptr,
                                          nullptr, -1);
  const Keyed kd = keyed_args(seeds, step_t, step, x, noise, generator);
  const bool draws = !kd.on() && !v.noise.has_value();
  const cuda::RngArgs rng = draws ? cuda_binding::rng_from(generator, seed, offset) : cuda::RngArgs{};
  if (v.empty) return validate::empty_result(v, x);
  auto s = cuda_binding::prepare_sampler({&v.x, &v.m}, v.noise, true, {}, false, v.dtype);
  if (s.launch.draw) s.launch.rng = rng;
  s.launch.keyed = kd.args;
  cuda::launch_langevin_step(s.launch, LangevinOp{step_size}, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return validate::in_format(s.out, v.format);
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("langevin_step", &langevin_step_cuda); }

}  // namespace diffkern
