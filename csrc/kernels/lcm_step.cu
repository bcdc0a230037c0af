// lcm_step and its clip-aware backward on CUDA: the sampler driver (elementwise.cuh) over
// LcmOp / LcmBackwardOp (lcm_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_lcm_step(const SamplerLaunch& p, const LcmOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

void launch_lcm_step_backward(const SamplerLaunch& p, const LcmBackwardOp& op, cudaStream_t stream) {
  launch_sampler(p, op, stream);
}

}  // namespace cuda
}  // namespace diffkern
