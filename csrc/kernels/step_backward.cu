// Fused backward of ddim_step / ddpm_step on CUDA: dL/dx, dL/dm (and dL/dnoise) in one pass.
#include "elementwise.cuh"

namespace diffkern {
namespace cuda {

// A step op's coefficients as the CPU backward forms them: in double, then rounded to the
// compute type (the emulation tests check the bits); out of line, away from the loop's
// registers.
template <class C, class Op>
__device__ __noinline__ StepCoeffs<C> step_coeffs(const Op& op, int64_t b) {
  return cast_coeffs<C>(op.template coeffs<double>(b));
}

template <class T, class Op>
__global__ void __launch_bounds__(kThreads) step_backward_kernel(const BackwardLaunch p, const Op op) {
  using C = typename Compute<T>::type;
  // Coefficients in double, rounded to C, as the CPU backward forms them; looked up again
  // only when the level index changes (a thread's elements are a grid apart).
  int64_t cached = 0;
  StepCoeffs<C> k = step_coeffs<C>(op, 0);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.numel; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t li = p.levels.index(e);
    if (li != cached) {
      cached = li;
      k = step_coeffs<C>(op, li);
    }
    const C g = to_c<C>(load_at<T>(p.grad, e));
    C gx, gm;
    step_backward<C>(k, to_c<C>(load_at<T>(p.x, e)), to_c<C>(load_at<T>(p.m, e)), g, op.has_clip, C(op.clip), &gx, &gm);
    static_cast<T*>(p.grad_x)[e] = from_c<T>(gx);
    static_cast<T*>(p.grad_m)[e] = from_c<T>(gm);
    if (p.grad_noise) static_cast<T*>(p.grad_noise)[e] = from_c<T>(k.std * g);
  }
}

template <class Op>
static void launch_backward(const BackwardLaunch& p, const Op& op, cudaStream_t stream) {
  const int grid = grid_for(p.numel, p.device);
  switch (p.dtype) {
    case DType::kFloat32: DK_LAUNCH((step_backward_kernel<float, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat16: DK_LAUNCH((step_backward_kernel<__half, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kBFloat16: DK_LAUNCH((step_backward_kernel<__nv_bfloat16, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat64: DK_LAUNCH((step_backward_kernel<double, Op>), grid, kThreads, 0, stream, p, op); break;
  }
}

void launch_step_backward(const BackwardLaunch& p, int kind, const DdimOp& ddim, const DdpmOp& ddpm,
                          cudaStream_t stream) {
  if (p.numel == 0) return;
  if (kind == 0)
    launch_backward(p, ddim, stream);
  else
    launch_backward(p, ddpm, stream);
}

}  // namespace cuda
}  // namespace diffkern
