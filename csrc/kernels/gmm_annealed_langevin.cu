// The fused annealed-Langevin chain on CUDA: one thread per point, the point's state in
// registers for every level and step; a block recomputes each level's component
// constants into shared memory (K <= kGmmMaxComponents, D <= kGmmMaxDim).
#include "elementwise.cuh"
#include "gmm.h"

namespace diffkern {
namespace cuda {

constexpr int kGmmThreads = 128;

template <class C>
__global__ void __launch_bounds__(kGmmThreads) gmm_kernel(const GmmLaunch p) {
  __shared__ C means[kGmmMaxComponents * kGmmMaxDim];
  __shared__ C inv_var[kGmmMaxComponents * kGmmMaxDim];
  __shared__ C lognorm[kGmmMaxComponents];
  const int D = p.D, K = p.K;
  const C* w = static_cast<const C*>(p.weights);
  const C* mu = static_cast<const C*>(p.means);
  const C* sd = static_cast<const C*>(p.stds);
  for (int i = threadIdx.x; i < K * D; i += blockDim.x) means[i] = mu[i];
  const PhiloxKey key = resolve_key(p.rng);
  const int64_t pt = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = pt < p.npoints;
  C* xs = static_cast<C*>(p.x);
  C x[kGmmMaxDim], score[kGmmMaxDim];
  float z[kGmmMaxDim];
  if (active)
    for (int d = 0; d < D; ++d) x[d] = xs[pt * D + d];
  const uint64_t numel = uint64_t(p.npoints) * uint64_t(D);
  uint64_t step = 0;
  for (int l = 0; l <= p.L; ++l) {  // l == L: the final denoising step, if asked for
    if (l == p.L && !p.denoise) break;
    const double sigma = l < p.L ? p.sigmas[l] : p.sigma_last;
    __syncthreads();  // everyone is done with the previous level's constants
    for (int k = threadIdx.x; k < K; k += blockDim.x) gmm_component_constants<C>(w, sd, k, D, C(sigma), inv_var, lognorm);
    __syncthreads();
    if (!active) continue;
    if (l == p.L) {
      gmm_score_point<C>(x, D, K, means, inv_var, lognorm, score);
      const C s2 = C(p.sigma_last * p.sigma_last);
      for (int d = 0; d < D; ++d) x[d] = x[d] + s2 * score[d];
      break;
    }
    const double ratio = sigma / p.sigma_last;
    const double alpha = p.step_lr * ratio * ratio;
    const C a = C(alpha), ns = C(sqrt(2 * alpha));
    for (int64_t s = 0; s < p.n_steps_each; ++s, ++step) {
      gmm_score_point<C>(x, D, K, means, inv_var, lognorm, score);
      gmm_step_noise(key, step, numel, uint64_t(pt), D, z);
      gmm_langevin_update<C>(x, score, z, D, a, ns);
    }
  }
  if (active)
    for (int d = 0; d < D; ++d) xs[pt * D + d] = x[d];
}

void launch_gmm_annealed_langevin(const GmmLaunch& p, cudaStream_t stream) {
  if (p.npoints == 0) return;
  const int grid = int((p.npoints + kGmmThreads - 1) / kGmmThreads);
  if (p.is_double)
    DK_LAUNCH(gmm_kernel<double>, grid, kGmmThreads, 0, stream, p);
  else
    DK_LAUNCH(gmm_kernel<float>, grid, kGmmThreads, 0, stream, p);
}

}  // namespace cuda
}  // namespace diffkern
