// (seed, offset) of the next draw from a CPU torch.Generator: the rule of
// diffkern/_rng.py's cpu_generator_key, in C++ so that a step keyed by a generator costs
// no Python (the Python version read the 5 KB state twice and drew from the generator
// through torch.randint: ~8 us a call). Both must give the same keys for the same
// generator history; tests/test_front_door.py replays histories through both.
#pragma once
#include <ATen/core/Generator.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "../kernels/philox.h"

namespace diffkern {

// Advances the generator as the Python rule does: one 32-bit draw per call (plus one
// 64-bit draw when it was used elsewhere since diffkern's last call).
std::pair<int64_t, int64_t> cpu_generator_key(const at::Generator& gen);

// The key of a drawing op: a CPU generator's when one is given (advancing it), else the
// (seed, offset) passed in. Nothing is advanced when the op does not draw.
inline PhiloxKey draw_key(const std::optional<at::Generator>& gen, int64_t seed, int64_t offset, bool draws) {
  if (draws && gen.has_value() && gen->defined() && gen->device().is_cpu()) {
    const auto k = cpu_generator_key(*gen);
    seed = k.first;
    offset = k.second;
  }
  return PhiloxKey{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

}  // namespace diffkern
