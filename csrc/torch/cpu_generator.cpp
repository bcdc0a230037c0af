// CPU generator keying (see cpu_generator.h and diffkern/_rng.py for the rule).
#include "cpu_generator.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

namespace diffkern {

std::pair<uint64_t, uint64_t> cpu_generator_key(const at::Generator& gen) {
  TORCH_CHECK_VALUE(gen.defined() && gen.device().is_cpu(), "generator must be a CPU generator here, got one on ",
                    gen.device());
  auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
  std::lock_guard<std::mutex> lock(impl->mutex_);  // as torch's own ops hold it while drawing
  const uint64_t seed = impl->random64();
  const uint64_t offset = impl->random64();
  return {seed, offset};
}

}  // namespace diffkern
