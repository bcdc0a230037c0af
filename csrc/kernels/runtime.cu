// Launch geometry shared by the kernels. Launch errors are checked by the bindings with
// torch's C10_CUDA_KERNEL_LAUNCH_CHECK right after each launch (csrc/torch/cuda/common.h).
#include <cuda_runtime.h>

#include <atomic>

#include "launch.h"

namespace diffkern {
namespace cuda {

// Enough resident blocks to fill every SM a few times over; the kernels grid-stride.
// The SM count is cached per device; host threads may launch concurrently, so the cache
// is atomic (a racing first lookup by two threads stores the same value twice).
int grid_for(int64_t work_items, int device) {
  static std::atomic<int> sm_count[64];  // zero-initialized (static storage)
  std::atomic<int>& slot = sm_count[device & 63];
  int sms = slot.load(std::memory_order_relaxed);
  if (sms <= 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      (void)cudaGetLastError();  // the failed query's error is ours: do not leave it to the next check
      sms = 132;
    }
    slot.store(sms, std::memory_order_relaxed);
  }
  constexpr int64_t kThreads = 256, kBlocksPerSm = 8;
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms) * kBlocksPerSm;
  return int(want < 1 ? 1 : (want < cap ? want : cap));
}

}  // namespace cuda
}  // namespace diffkern
