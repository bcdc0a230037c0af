// ddim_step on CUDA: the shared driver (elementwise.cuh) over DdimOp (ddim.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_ddim_step(const SamplerLaunch& p, const DdimOp& op, cudaStream_t stream) {
  launch_sampler(p, SampleStep<DdimOp>{op}, stream);
}

}  // namespace cuda
}  // namespace diffkern
