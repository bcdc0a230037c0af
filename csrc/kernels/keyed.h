// Per-sample keyed noise on CUDA (philox.h keyed_normal_at): the launcher's plain struct.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace diffkern {
namespace cuda {

struct KeyedLaunch {
  const int64_t* seeds = nullptr;  // device memory: 1 (all samples) or one per sample
  int64_t nseeds = 1;
  const int64_t* step_ptr = nullptr;  // device memory, read in the kernel (graph replay); else `step`
  uint64_t step = 0;
  int64_t inner = 1;  // elements per sample
  int64_t numel = 0;
  float* out = nullptr;  // (numel,) contiguous
  int device = 0;
};

void launch_keyed_normal(const KeyedLaunch& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
