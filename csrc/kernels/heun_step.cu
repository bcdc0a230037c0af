// heun_step on CUDA: the sampler driver (elementwise.cuh) over HeunOp (heun_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_heun_step(const SamplerLaunch& p, const HeunOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
