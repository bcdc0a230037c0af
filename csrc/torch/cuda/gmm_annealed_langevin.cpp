#include "../../kernels/gmm.h"
#include "common.h"

namespace diffkern {

at::Tensor gmm_annealed_langevin_cuda(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& means,
                                      const at::Tensor& stds, const at::Tensor& sigmas, int64_t n_steps_each,
                                      double step_lr, bool denoise, const std::optional<at::Generator>& generator,
                                      int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  validate::mixture(x, weights, means, stds, sigmas, n_steps_each, step_lr);
  validate::generator_device(generator, x);
  const int D = int(x.size(-1)), K = int(weights.numel());
  TORCH_CHECK_VALUE(D >= 1 && D <= kGmmMaxDim, "gmm_annealed_langevin: D must be in [1, ", kGmmMaxDim, "] on CUDA");
  TORCH_CHECK_VALUE(K >= 1 && K <= kGmmMaxComponents, "gmm_annealed_langevin: K must be in [1, ", kGmmMaxComponents,
                    "] on CUDA");
  const cuda::RngArgs rng = cuda_binding::rng_from(generator, seed, offset);  // before any return
  if (x.numel() == 0) return x.contiguous().clone();
  at::Tensor out = x.contiguous().clone();
  const at::Tensor w = weights.to(x.scalar_type()).contiguous(), mu = means.to(x.scalar_type()).contiguous(),
                   sd = (stds.dim() == 1 ? stds.unsqueeze(1) : stds).to(x.scalar_type()).expand({K, D}).contiguous();
  const at::Tensor sig = sigmas.to(x.device(), at::kDouble).contiguous();
  cuda::GmmLaunch p;
  p.is_double = x.scalar_type() == at::kDouble;
  p.x = out.data_ptr();
  p.npoints = out.numel() / D;
  p.D = D;
  p.K = K;
  p.weights = w.data_ptr();
  p.means = mu.data_ptr();
  p.stds = sd.data_ptr();
  p.sigmas = sig.data_ptr<double>();
  p.L = int(sig.numel());
  p.n_steps_each = n_steps_each;
  p.step_lr = step_lr;
  // The last sigma is needed on the host for alpha; sigmas arrive from Python on the CPU
  // side too, so this read does not wait on the GPU in practice.
  p.sigma_last = sigmas.to(at::kCPU, at::kDouble).reshape({-1})[-1].item<double>();
  p.denoise = denoise;
  p.rng = rng;
  p.device = x.get_device();
  cuda::launch_gmm_annealed_langevin(p, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("gmm_annealed_langevin", &gmm_annealed_langevin_cuda); }

}  // namespace diffkern
