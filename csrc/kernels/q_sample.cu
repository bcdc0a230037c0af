// q_sample on CUDA: the shared driver (elementwise.cuh) over QSampleOp (step_ops.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_q_sample(const StepLaunch& p, const QSampleOp& op, cudaStream_t stream) { launch_elementwise(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
