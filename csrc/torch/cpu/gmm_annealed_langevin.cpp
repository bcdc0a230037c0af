// The fused annealed-Langevin chain for the analytic mixture score, on the CPU: blocks of
// points in parallel, each block's whole chain in L1 (structure of arrays, vectorized over
// points); per-level component constants computed once and shared.
#include "../cpu_generator.h"
#include "../validate.h"
#include "elementwise.h"

#include "../../kernels/gmm.h"

namespace diffkern {

namespace {

constexpr int kBlock = 256;  // points advanced together: the inner loops run over points (SIMD)

template <class C>
inline C exp_vec(C v) {
  return dk_exp<C>(v);
}
template <>
inline float exp_vec<float>(float v) {
  return exp_poly(v);
}

// Advances points [p0, p0 + P) through the whole chain. State is kept structure-of-arrays
// (x[d][p]) so every loop below is a loop over points that the compiler vectorizes; the
// score is gmm.h's two-pass softmax, its terms in gmm_score_point's order (q_k kept per
// point here instead of recomputed).
template <class C>
void chain_block(C* xs, int64_t p0, int P, int D, int K, const C* means, const std::vector<C>& inv_var,
                 const std::vector<C>& lognorm, const std::vector<double>& sigmas, int64_t n_steps_each,
                 double step_lr, bool denoise, PhiloxKey key, uint64_t numel, std::vector<C>& lp) {
  const int L = int(sigmas.size());
  const double sigma_L = sigmas[L - 1];
  alignas(64) C x[kGmmMaxDim][kBlock], acc[kGmmMaxDim][kBlock];
  alignas(64) C mx[kBlock], denom[kBlock];
  alignas(64) float zbuf[cpu::kChunk];
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < D; ++d) x[d][p] = xs[(p0 + p) * D + d];

  // acc[d][p] <- the unnormalized score of x at `level`, denom[p] its normalizer (the
  // score is acc / denom). Zeroing, finishing and dividing ride along in the first or
  // last pass of each loop (same operations per element, fewer sweeps over the block).
  auto score = [&](int level) {
    const C* iv = &inv_var[size_t(level) * K * D];
    const C* ln = &lognorm[size_t(level) * K];
    for (int p = 0; p < P; ++p) mx[p] = C(-__builtin_huge_val());
    for (int k = 0; k < K; ++k) {
      C* l = &lp[size_t(k) * kBlock];
      for (int d = 0; d < D; ++d) {
        const C mu = means[k * D + d], w = iv[k * D + d];
        const C* xd = x[d];
        if (d == 0 && d == D - 1) {
#pragma omp simd
          for (int p = 0; p < P; ++p) {
            l[p] = gmm_log_weight<C>(ln[k], C(0) + gmm_quad_term<C>(mu, xd[p], w));
            mx[p] = l[p] > mx[p] ? l[p] : mx[p];
          }
        } else if (d == 0) {
#pragma omp simd
          for (int p = 0; p < P; ++p) {
            l[p] = C(0) + gmm_quad_term<C>(mu, xd[p], w);
          }
        } else if (d < D - 1) {
#pragma omp simd
          for (int p = 0; p < P; ++p) {
            l[p] += gmm_quad_term<C>(mu, xd[p], w);
          }
        } else {
#pragma omp simd
          for (int p = 0; p < P; ++p) {
            l[p] = gmm_log_weight<C>(ln[k], l[p] + gmm_quad_term<C>(mu, xd[p], w));
            mx[p] = l[p] > mx[p] ? l[p] : mx[p];
          }
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      C* l = &lp[size_t(k) * kBlock];
      if (k == 0) {
#pragma omp simd
        for (int p = 0; p < P; ++p) {
          l[p] = exp_vec<C>(l[p] - mx[p]);
          denom[p] = C(0) + l[p];
        }
      } else {
#pragma omp simd
        for (int p = 0; p < P; ++p) {
          l[p] = exp_vec<C>(l[p] - mx[p]);
          denom[p] += l[p];
        }
      }
      for (int d = 0; d < D; ++d) {
        const C mu = means[k * D + d], w = iv[k * D + d];
        const C* xd = x[d];
        C* ad = acc[d];
        if (k == 0) {
#pragma omp simd
          for (int p = 0; p < P; ++p) ad[p] = C(0) + gmm_pull<C>(l[p], mu, xd[p], w);
        } else {
#pragma omp simd
          for (int p = 0; p < P; ++p) ad[p] += gmm_pull<C>(l[p], mu, xd[p], w);
        }
      }
    }
  };

  uint64_t step = 0;
  for (int l = 0; l < L; ++l) {
    const double alpha = step_lr * (sigmas[l] / sigma_L) * (sigmas[l] / sigma_L);
    const C a = C(alpha), ns = C(std::sqrt(2 * alpha));
    for (int64_t s = 0; s < n_steps_each; ++s, ++step) {
      score(l);
      // This block's normals: logical indices step*numel + p0*D .. + P*D (gmm_step_noise's keying).
      const uint64_t base = step * numel + uint64_t(p0) * uint64_t(D);
      const uint64_t g0 = base >> 2, g1 = (base + uint64_t(P) * D - 1) >> 2;
      simd::fill_normals(key, g0, int64_t(g1 - g0 + 1), zbuf);
      const float* z = zbuf + (base - 4 * g0);
      if (D == 2) {  // the noise is point-major (z[2p + d]): a stride-2 pair gcc de-interleaves with
                     // permutes, where the general loop below gathers
#pragma omp simd
        for (int p = 0; p < P; ++p) {
          x[0][p] = (x[0][p] + a * (acc[0][p] / denom[p])) + ns * C(z[2 * p]);
          x[1][p] = (x[1][p] + a * (acc[1][p] / denom[p])) + ns * C(z[2 * p + 1]);
        }
      } else {
        for (int d = 0; d < D; ++d)
#pragma omp simd
          for (int p = 0; p < P; ++p) x[d][p] = (x[d][p] + a * (acc[d][p] / denom[p])) + ns * C(z[p * D + d]);
      }
    }
  }
  if (denoise) {
    score(L);
    const C s2 = C(sigma_L * sigma_L);
    for (int d = 0; d < D; ++d)
      for (int p = 0; p < P; ++p) x[d][p] = x[d][p] + s2 * (acc[d][p] / denom[p]);
  }
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < D; ++d) xs[(p0 + p) * D + d] = x[d][p];
}

template <class C>
void chain(C* xs, int64_t npoints, int D, int K, const C* weights, const C* means, const C* stds,
           const std::vector<double>& sigmas, int64_t n_steps_each, double step_lr, bool denoise, PhiloxKey key) {
  const int L = int(sigmas.size());
  std::vector<C> inv_var(size_t(L + 1) * K * D), lognorm(size_t(L + 1) * K);
  for (int l = 0; l <= L; ++l)  // level L: the final denoising step at sigma_L
    for (int k = 0; k < K; ++k)
      gmm_component_constants<C>(weights, stds, k, D, C(sigmas[std::min(l, L - 1)]), &inv_var[size_t(l) * K * D],
                                 &lognorm[size_t(l) * K]);
  const uint64_t numel = uint64_t(npoints) * uint64_t(D);
  // A block's normals for one step (P*D of them, plus group alignment) must fit the
  // noise buffer.
  const int block = std::min<int>(kBlock, int((cpu::kChunk - 8) / D));
  const int64_t nblocks = (npoints + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<C> lp(size_t(K) * kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * block;
      const int P = int(std::min<int64_t>(block, npoints - p0));
      chain_block<C>(xs, p0, P, D, K, means, inv_var, lognorm, sigmas, n_steps_each, step_lr, denoise, key, numel,
                     lp);
    }
  });
}

}  // namespace

at::Tensor gmm_annealed_langevin_cpu(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& means,
                                     const at::Tensor& stds, const at::Tensor& sigmas, int64_t n_steps_each,
                                     double step_lr, bool denoise, const std::optional<at::Generator>& generator,
                                     int64_t seed, int64_t offset) {
  validate::mixture(x, weights, means, stds, sigmas, n_steps_each, step_lr);
  validate::generator_device(generator, x);
  const int D = int(x.size(-1));
  const int K = int(weights.numel());
  TORCH_CHECK_VALUE(D >= 1 && D <= kGmmMaxDim, "gmm_annealed_langevin: D must be in [1, ", kGmmMaxDim, "], got ", D);
  const PhiloxKey key = draw_key(generator, seed, offset, true);  // before any return, as on the reference path
  if (x.numel() == 0) return x.contiguous().clone();
  at::Tensor out = x.contiguous().clone();
  const at::Tensor sig = sigmas.to(at::kDouble).contiguous();
  std::vector<double> sv(sig.data_ptr<double>(), sig.data_ptr<double>() + sig.numel());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gmm_annealed_langevin_cpu", [&] {
    const at::Tensor w = weights.to(x.scalar_type()).contiguous(), mu = means.to(x.scalar_type()).contiguous(),
                     sd = (stds.dim() == 1 ? stds.unsqueeze(1) : stds).to(x.scalar_type()).expand({K, D}).contiguous();
    chain<scalar_t>(out.data_ptr<scalar_t>(), out.numel() / D, D, K, w.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                    sd.data_ptr<scalar_t>(), sv, n_steps_each, step_lr, denoise, key);
  });
  return out;
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("gmm_annealed_langevin", &gmm_annealed_langevin_cpu); }

}  // namespace diffkern
