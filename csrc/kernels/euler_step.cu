// euler_step on CUDA: the sampler driver (elementwise.cuh) over EulerOp (euler_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_euler_step(const SamplerLaunch& p, const EulerOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
