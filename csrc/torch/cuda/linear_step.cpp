#include "common.h"

namespace diffkern {

std::vector<at::Tensor> linear_step_cuda(at::TensorList inputs, c10::ArrayRef<double> coeffs,
                                         const std::optional<at::Tensor>& coeffs_t, int64_t outputs, bool noisy,
                                         const std::optional<at::Tensor>& noise,
                                         const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  TORCH_CHECK(!inputs.empty(), "linear_step needs at least one input");
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const LinearOp op = linear_op(int64_t(inputs.size()), outputs, coeffs, coeffs_t, inputs[0]);
  const auto io = linear_operands(inputs, noise, noisy, generator);
  std::array<const at::Tensor*, kMaxLinearInputs> ptrs{};
  for (size_t j = 0; j < inputs.size(); ++j) ptrs[j] = io.input(int(j));
  auto s = cuda_binding::prepare_outputs(c10::ArrayRef<const at::Tensor*>(ptrs.data(), inputs.size()),
                                         io.noise, noisy, per_sample_shape(inputs[0], op.per_sample()), int(outputs),
                                         io.dtype);
  const Keyed kd = keyed_args(seeds, step_t, step, inputs[0], noise, generator);
  if (s.launch.draw && !kd.on()) s.launch.rng = cuda_binding::rng_from(generator, seed, offset);
  s.launch.keyed = kd.args;
  if (s.launch.numel > 0) {  // a check only right after a launch of ours
    cuda::launch_linear_step(s.launch, op, c10::cuda::getCurrentCUDAStream());
    DIFFKERN_LAUNCH_CHECK();
  }
  const at::Tensor all[3] = {s.out, s.out1, s.out2};
  std::vector<at::Tensor> r;
  for (int64_t j = 0; j < outputs; ++j) r.push_back(cuda_binding::in_x_format(all[j], inputs[0]));
  return r;
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("linear_step", &linear_step_cuda); }

}  // namespace diffkern
