// The fused annealed-Langevin chain for the analytic mixture score, on the CPU: points in
// parallel, each point's whole chain in registers; per-level component constants are
// computed once and shared.
#include "elementwise.h"

#include "../../kernels/gmm.h"

namespace diffkern {

namespace {
template <class C>
void chain(C* xs, int64_t npoints, int D, int K, const C* weights, const C* means, const C* stds,
           const std::vector<double>& sigmas, int64_t n_steps_each, double step_lr, bool denoise, PhiloxKey key) {
  const int L = int(sigmas.size());
  std::vector<C> inv_var(size_t(L + 1) * K * D), lognorm(size_t(L + 1) * K);
  for (int l = 0; l <= L; ++l)  // level L: the final denoising step at sigma_L
    for (int k = 0; k < K; ++k)
      gmm_component_constants<C>(weights, stds, k, D, C(sigmas[std::min(l, L - 1)]), &inv_var[size_t(l) * K * D],
                                 &lognorm[size_t(l) * K]);
  const double sigma_L = sigmas[L - 1];
  const uint64_t numel = uint64_t(npoints) * uint64_t(D);
  at::parallel_for(0, npoints, 64, [&](int64_t p0, int64_t p1) {
    C x[kGmmMaxDim], score[kGmmMaxDim];
    float z[kGmmMaxDim];
    for (int64_t p = p0; p < p1; ++p) {
      for (int d = 0; d < D; ++d) x[d] = xs[p * D + d];
      uint64_t step = 0;
      for (int l = 0; l < L; ++l) {
        const double alpha = step_lr * (sigmas[l] / sigma_L) * (sigmas[l] / sigma_L);
        const C a = C(alpha), ns = C(std::sqrt(2 * alpha));
        const C* iv = &inv_var[size_t(l) * K * D];
        const C* ln = &lognorm[size_t(l) * K];
        for (int64_t s = 0; s < n_steps_each; ++s, ++step) {
          gmm_score_point<C>(x, D, K, means, iv, ln, score);
          gmm_step_noise(key, step, numel, uint64_t(p), D, z);
          gmm_langevin_update<C>(x, score, z, D, a, ns);
        }
      }
      if (denoise) {
        gmm_score_point<C>(x, D, K, means, &inv_var[size_t(L) * K * D], &lognorm[size_t(L) * K], score);
        const C s2 = C(sigma_L * sigma_L);
        for (int d = 0; d < D; ++d) x[d] = x[d] + s2 * score[d];
      }
      for (int d = 0; d < D; ++d) xs[p * D + d] = x[d];
    }
  });
}
}  // namespace

at::Tensor gmm_annealed_langevin_cpu(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& means,
                                     const at::Tensor& stds, const at::Tensor& sigmas, int64_t n_steps_each,
                                     double step_lr, bool denoise, const std::optional<at::Generator>& /*generator*/,
                                     int64_t seed, int64_t offset) {
  TORCH_CHECK(x.dim() >= 1, "x must be (..., D)");
  const int D = int(x.size(-1));
  const int K = int(weights.numel());
  TORCH_CHECK(D >= 1 && D <= kGmmMaxDim, "gmm_annealed_langevin: D must be in [1, ", kGmmMaxDim, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  TORCH_CHECK(sigmas.numel() >= 1, "sigmas must not be empty");
  at::Tensor out = x.contiguous().clone();
  const at::Tensor sig = sigmas.to(at::kDouble).contiguous();
  std::vector<double> sv(sig.data_ptr<double>(), sig.data_ptr<double>() + sig.numel());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gmm_annealed_langevin_cpu", [&] {
    const at::Tensor w = weights.to(x.scalar_type()).contiguous(), mu = means.to(x.scalar_type()).contiguous(),
                     sd = stds.to(x.scalar_type()).expand({K, D}).contiguous();
    chain<scalar_t>(out.data_ptr<scalar_t>(), out.numel() / D, D, K, w.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                    sd.data_ptr<scalar_t>(), sv, n_steps_each, step_lr, denoise, PhiloxKey{as_u64(seed), as_u64(offset)});
  });
  return out;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("gmm_annealed_langevin", &gmm_annealed_langevin_cpu); }

}  // namespace diffkern
