// (seed, offset) of the next draw from a CPU torch.Generator: its next two 64-bit words
// (mt19937 random64()), taken under the generator's lock. The noise is then a function of
// the generator's state: get_state/set_state and fork_rng replay it, and concurrent
// callers never share a key. diffkern/_rng.py's py_cpu_generator_key draws the same two
// words (random_(-2**63, None) on two int64); tests/test_front_door.py replays histories
// through both.
#pragma once
#include <ATen/core/Generator.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "../kernels/philox.h"

namespace diffkern {

// Advances the generator by the two words.
std::pair<uint64_t, uint64_t> cpu_generator_key(const at::Generator& gen);

// The key of a drawing op: a CPU generator's when one is given (advancing it), else the
// (seed, offset) passed in. Nothing is advanced when the op does not draw.
inline PhiloxKey draw_key(const std::optional<at::Generator>& gen, int64_t seed, int64_t offset, bool draws) {
  if (draws && gen.has_value() && gen->defined() && gen->device().is_cpu()) {
    const auto k = cpu_generator_key(*gen);
    return PhiloxKey{k.first, k.second};
  }
  return PhiloxKey{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

}  // namespace diffkern
