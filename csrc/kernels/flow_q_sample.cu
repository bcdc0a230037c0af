// flow_q_sample on CUDA: the sampler driver (elementwise.cuh) over FlowQSampleOp (flow_q_sample.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_flow_q_sample(const SamplerLaunch& p, const FlowQSampleOp& op, cudaStream_t stream) { launch_sampler(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
