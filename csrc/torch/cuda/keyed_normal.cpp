// Per-sample keyed normals on CUDA: translation to the launcher (kernels/keyed_normal.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../../kernels/keyed.h"
#include "../common.h"
#include "common.h"

namespace diffkern {

at::Tensor keyed_normal_cuda(const at::Tensor& seeds, const std::optional<at::Tensor>& step_t, int64_t step,
                             int64_t batch, int64_t inner) {
  TORCH_CHECK(seeds.is_cuda() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "seeds must be a 1-D int64 CUDA tensor");
  TORCH_CHECK(seeds.numel() == 1 || seeds.numel() == batch, "seeds must hold 1 or batch values");
  TORCH_CHECK(batch >= 0 && inner >= 0, "batch and inner must be >= 0");
  const c10::cuda::CUDAGuard guard(seeds.device());
  at::Tensor out = at::empty({batch, inner}, seeds.options().dtype(at::kFloat));
  const at::Tensor s = seeds.contiguous();
  cuda::KeyedLaunch p;
  p.seeds = s.data_ptr<int64_t>();
  p.nseeds = s.numel();
  at::Tensor st;
  if (step_t.has_value()) {
    TORCH_CHECK(step_t->numel() == 1 && step_t->scalar_type() == at::kLong, "step must be one int64 value");
    st = step_t->to(seeds.device()).contiguous();  // no copy when already there (graph-safe)
    p.step_ptr = st.data_ptr<int64_t>();
  } else {
    p.step = as_u64(step);
  }
  p.inner = inner;
  p.numel = batch * inner;
  p.out = out.data_ptr<float>();
  p.device = seeds.get_device();
  cuda::launch_keyed_normal(p, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("keyed_normal", &keyed_normal_cuda); }

}  // namespace diffkern
