#include "elementwise.h"

namespace diffkern {

at::Tensor langevin_step_cpu(const at::Tensor& x, const at::Tensor& score, double step_size,
                             const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                             int64_t seed, int64_t offset) {
  const LangevinOp op{step_size};
  return cpu::run_step(op, x, &score, noise, true, cpu_philox_key(generator, seed, offset), false);
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("langevin_step", &langevin_step_cpu); }

}  // namespace diffkern
