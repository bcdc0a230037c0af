// linear_step on CUDA: the sampler driver (elementwise.cuh) over LinearOp (linear_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_linear_step(const SamplerLaunch& p, const LinearOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
