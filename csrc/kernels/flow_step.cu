// flow_step on CUDA: the sampler driver (elementwise.cuh) over FlowOp (flow_step.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_flow_step(const SamplerLaunch& p, const FlowOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
