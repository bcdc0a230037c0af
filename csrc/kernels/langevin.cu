// langevin_step on CUDA: the shared driver (elementwise.cuh) over LangevinOp (langevin.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_langevin_step(const SamplerLaunch& p, const LangevinOp& op, cudaStream_t stream) {
  launch_sampler(p, SampleStep<LangevinOp>{op}, stream);
}

}  // namespace cuda
}  // namespace diffkern
