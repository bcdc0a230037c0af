#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> q_sample_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                 const at::Tensor& alphas_cumprod,
                                                 const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Generator>& generator, int64_t seed,
                                                 int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const validate::Step v = validate::step(x0, "x0", nullptr, nullptr, noise, true, generator, &alphas_cumprod, &t,
                                          nullptr, -1);
  const Keyed kd = keyed_args(seeds, step_t, step, x0, noise, generator);
  const bool draws = !kd.on() && !v.noise.has_value();
  const cuda::RngArgs rng = draws ? cuda_binding::rng_from(generator, seed, offset) : cuda::RngArgs{};
  const auto none = [&] { return at::empty({0}, x0.options().dtype(v.dtype)); };
  if (v.empty) return {validate::empty_result(v, x0), noise.has_value() ? none() : validate::empty_result(v, x0)};
  auto s = cuda_binding::prepare_sampler({&v.x}, v.noise, true, v.ts.t.sizes(), draws, v.dtype);
  if (s.launch.draw) s.launch.rng = rng;
  s.launch.keyed = kd.args;
  const QSampleOp op{timestep_args(alphas_cumprod, v.ts.t, std::nullopt)};
  cuda::launch_q_sample(s.launch, op, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return {validate::in_format(s.out, v.format), noise.has_value() ? none() : validate::in_format(s.out1, v.format)};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("q_sample", &q_sample_cuda); }

}  // namespace diffkern
