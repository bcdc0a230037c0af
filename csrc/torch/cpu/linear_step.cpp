#include "../cpu_generator.h"
#include "../sampler_args.h"
#include "elementwise.h"

namespace diffkern {

std::vector<at::Tensor> linear_step_cpu(at::TensorList inputs, c10::ArrayRef<double> coeffs,
                                        const std::optional<at::Tensor>& coeffs_t, int64_t outputs, bool noisy,
                                        const std::optional<at::Tensor>& noise,
                                        const std::optional<at::Generator>& generator,
                                        int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  TORCH_CHECK(!inputs.empty(), "linear_step needs at least one input");
  const LinearOp op = linear_op(int64_t(inputs.size()), outputs, coeffs, coeffs_t, inputs[0]);
  const auto io = linear_operands(inputs, noise, noisy, generator);
  const Keyed kd = keyed_args(seeds, step_t, step, inputs[0], noise, generator);
  const PhiloxKey key = draw_key(generator, seed, offset, !kd.on() && noisy && !io.noise.has_value());
  std::array<const at::Tensor*, kMaxLinearInputs> ptrs{};
  for (size_t j = 0; j < inputs.size(); ++j) ptrs[j] = io.input(int(j));
  auto outs = cpu::run_outputs(op, c10::ArrayRef<const at::Tensor*>(ptrs.data(), inputs.size()),
                               io.noise, noisy, key,
                               per_sample_shape(inputs[0], op.per_sample()), int(outputs),
                               kd.args, io.dtype);
  return std::vector<at::Tensor>(outs.begin(), outs.begin() + outputs);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("linear_step", &linear_step_cpu); }

}  // namespace diffkern
