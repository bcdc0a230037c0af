// Per-sample keyed normals on the CPU: chunks of the logical range over at::parallel_for,
// each filled by simd::fill_keyed_normals (cut at sample boundaries).
#include <ATen/Parallel.h>

#include "../../kernels/philox_simd.h"
#include "../common.h"

namespace diffkern {

// The step of a keyed call: the 1-element int64 tensor when given (read on its device by
// the CUDA kernel), else the int.
inline uint64_t keyed_step_cpu(const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!step_t.has_value()) return as_u64(step);
  TORCH_CHECK(step_t->numel() == 1 && step_t->scalar_type() == at::kLong, "step must be one int64 value");
  return as_u64(step_t->cpu().item<int64_t>());
}

at::Tensor keyed_normal_cpu(const at::Tensor& seeds, const std::optional<at::Tensor>& step_t, int64_t step,
                            int64_t batch, int64_t inner) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "seeds must be a 1-D int64 tensor");
  TORCH_CHECK(seeds.numel() == 1 || seeds.numel() == batch, "seeds must hold 1 or batch values");
  TORCH_CHECK(batch >= 0 && inner >= 0, "batch and inner must be >= 0");
  at::Tensor out = at::empty({batch, inner}, seeds.options().dtype(at::kFloat));
  const int64_t numel = batch * inner;
  if (numel == 0) return out;
  const at::Tensor s = seeds.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t ns = s.numel();
  const uint64_t st = keyed_step_cpu(step_t, step);
  float* o = out.data_ptr<float>();
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, 8, [&](int64_t c0, int64_t c1) {
    const int64_t e0 = c0 * kChunk, e1 = std::min(numel, c1 * kChunk);
    simd::fill_keyed_normals(sp, ns, st, inner, e0, e1 - e0, o + e0);
  });
  return out;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("keyed_normal", &keyed_normal_cpu); }

}  // namespace diffkern
