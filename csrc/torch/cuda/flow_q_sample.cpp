#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor> flow_q_sample_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& sigma_t,
                                                      double sigma, const std::optional<at::Tensor>& noise,
                                                      const std::optional<at::Generator>& generator, int64_t seed,
                                                      int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const auto io = validate::operands({{&x0, "x0"}}, noise, true, generator);
  LevelSet lv(x0, {{&sigma_t, "sigma"}});
  const FlowQSampleOp op = flow_q_sample_op(lv, sigma_t, sigma);
  auto s = cuda_binding::prepare_sampler({io.input(0)}, io.noise, true, lv.shape(), !noise.has_value(),
                                         io.dtype);
  const Keyed kd = keyed_args(seeds, step_t, step, x0, noise, generator);
  if (s.launch.draw && !kd.on()) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  s.launch.keyed = kd.args;
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_flow_q_sample(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  return {cuda_binding::in_x_format(s.out, x0),
          noise.has_value() ? at::empty({0}, x0.options()) : cuda_binding::in_x_format(s.out1, x0)};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("flow_q_sample", &flow_q_sample_cuda); }

}  // namespace diffkern
