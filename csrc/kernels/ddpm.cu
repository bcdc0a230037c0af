// ddpm_step on CUDA: the shared driver (elementwise.cuh) over DdpmOp (ddpm.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_ddpm_step(const SamplerLaunch& p, const DdpmOp& op, cudaStream_t stream) {
  launch_sampler(p, SampleStep<DdpmOp>{op}, stream);
}

}  // namespace cuda
}  // namespace diffkern
