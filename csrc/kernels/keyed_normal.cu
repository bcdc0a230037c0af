// Per-sample keyed normals on CUDA: one thread per 4 consecutive logical elements; one
// Philox group when they lie in one sample on a group boundary, else one group per element.
// Keys and step are read from device memory, so a captured graph draws the noise of
// whatever seeds/step its buffers hold at replay.
#include <cuda_runtime.h>

#include "keyed.h"
#include "philox.h"

namespace diffkern {
namespace cuda {

int grid_for(int64_t work_items, int device);

__global__ void __launch_bounds__(256) keyed_normal_kernel(const KeyedLaunch p) {
  const uint64_t step = p.step_ptr ? uint64_t(*p.step_ptr) : p.step;
  const int64_t nunits = (p.numel + 3) / 4;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < nunits; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = 4 * u;
    const int64_t n = p.numel - e0 < 4 ? p.numel - e0 : 4;
    const int64_t b0 = e0 / p.inner, j0 = e0 - b0 * p.inner;
    if (n == 4 && (j0 & 3) == 0 && j0 + 4 <= p.inner) {
      const PhiloxKey key = keyed_key(uint64_t(p.seeds[p.nseeds == 1 ? 0 : b0]), step);
      const Float4 z = philox_normal4(key, kKeyedGroup + uint64_t(j0 >> 2));
      *reinterpret_cast<float4*>(p.out + e0) = make_float4(z.v[0], z.v[1], z.v[2], z.v[3]);
    } else {
#pragma unroll 1
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = e0 + i, b = e / p.inner, j = e - b * p.inner;
        p.out[e] = keyed_normal_at(uint64_t(p.seeds[p.nseeds == 1 ? 0 : b]), step, uint64_t(j));
      }
    }
  }
}

void launch_keyed_normal(const KeyedLaunch& p, cudaStream_t stream) {
  if (p.numel == 0) return;
  DK_LAUNCH(keyed_normal_kernel, grid_for((p.numel + 3) / 4, p.device), 256, 0, stream, p);
}

}  // namespace cuda
}  // namespace diffkern
