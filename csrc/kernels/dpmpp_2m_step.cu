// dpmpp_2m_step on CUDA: the sampler driver (elementwise.cuh) over DpmppOp (dpmpp_2m_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_dpmpp_2m_step(const SamplerLaunch& p, const DpmppOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
