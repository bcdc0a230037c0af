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
  std::array<const at::Tensor*, kMaxLinearInputs> ptrs{};
  for (size_t j = 0; j < inputs.size(); ++j) ptrs[j] = &inputs[j];
  auto outs = cpu::run_outputs(op, c10::ArrayRef<const at::Tensor*>(ptrs.data(), inputs.size()),
                               noisy ? noise : std::nullopt, noisy, PhiloxKey{as_u64(seed), as_u64(offset)},
                               per_sample_shape(inputs[0], op.per_sample()), int(outputs),
                               keyed_args(seeds, step_t, step, inputs[0], noise, generator).args);
  return std::vector<at::Tensor>(outs.begin(), outs.begin() + outputs);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("linear_step", &linear_step_cpu); }

}  // namespace diffkern
