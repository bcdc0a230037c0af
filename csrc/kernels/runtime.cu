// Launch geometry and error reporting shared by the kernels.
#include <cuda_runtime.h>

#include "launch.h"

namespace diffkern {
namespace cuda {

// Enough resident blocks to fill every SM a few times over; the kernels grid-stride.
int grid_for(int64_t work_items, int device) {
  static int sm_count[64] = {0};
  int& sms = sm_count[device & 63];
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  }
  constexpr int64_t kThreads = 256, kBlocksPerSm = 8;
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms) * kBlocksPerSm;
  return int(want < 1 ? 1 : (want < cap ? want : cap));
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace diffkern
