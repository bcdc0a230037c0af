// Stand-in for ATen's parallel_for where tests compile the CPU driver
// (csrc/torch/cpu/driver.h) without linking torch (tests/native/cuda_emu_tests.cpp). The
// range is cut into three pieces run in turn, so a call still starts chunks in the middle
// of its range, as it does on several threads.
#pragma once
#include <algorithm>
#include <cstdint>

namespace at {

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t /*grain_size*/, const F& f) {
  const int64_t piece = std::max<int64_t>(1, (end - begin + 2) / 3);
  for (int64_t b = begin; b < end; b += piece) f(b, std::min(end, b + piece));
}

}  // namespace at
