// q_sample on CUDA: the shared driver (elementwise.cuh) over QSampleOp (q_sample.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_q_sample(const SamplerLaunch& p, const QSampleOp& op, cudaStream_t stream) {
  launch_sampler(p, SampleStep<QSampleOp>{op}, stream);
}

}  // namespace cuda
}  // namespace diffkern
