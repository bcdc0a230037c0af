// langevin_step on CUDA: the shared driver (elementwise.cuh) over LangevinOp (step_ops.h).
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

void launch_langevin_step(const StepLaunch& p, const LangevinOp& op, cudaStream_t stream) { launch_elementwise(p, op, stream); }

}  // namespace cuda
}  // namespace diffkern
