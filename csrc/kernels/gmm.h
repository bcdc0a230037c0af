// Annealed Langevin on the exact score of a diagonal Gaussian mixture. The score's terms
// (gmm_quad_term, gmm_log_weight, gmm_pull) and their order are written once here: the
// CUDA kernel evaluates them a point at a time (gmm_score_point, a point's state in
// registers for the whole chain), the CPU chain (csrc/torch/cpu/gmm_annealed_langevin.cpp)
// a block of points at a time, vectorized over points; both as a two-pass softmax.
#pragma once
#include "philox.h"

namespace diffkern {

constexpr int kGmmMaxDim = 16;
constexpr int kGmmMaxComponents = 64;  // the CUDA kernel keeps a level's constants in shared memory

template <class C>
DK_HD C dk_log(C v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return __builtin_log(v);
#endif
}
template <class C>
DK_HD C dk_exp(C v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return __builtin_exp(v);
#endif
}
template <>
DK_HD float dk_log<float>(float v) {
#if defined(__CUDA_ARCH__)
  return ::logf(v);
#else
  return __builtin_logf(v);
#endif
}
template <>
DK_HD float dk_exp<float>(float v) {
#if defined(__CUDA_ARCH__)
  return ::expf(v);
#else
  return __builtin_expf(v);
#endif
}

// exp for the CPU's vectorized loops (Cephes expf: 2^n times a degree-6 polynomial on
// |r| <= ln2/2; about 1 ulp). Branch-free; arguments below -87 flush towards 0.
DK_HD float exp_poly(float v) {
  v = v < -87.0f ? -87.0f : v;  // one-level selects: gcc if-converts these, not nested ones
  v = v > 88.0f ? 88.0f : v;
  // Round to nearest by adding and removing 1.5 * 2^23 (|v log2 e| < 2^22 here): plain
  // arithmetic, where floorf is a libm call that gcc will not vectorize.
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * (r * r) + r) + 1.0f;
  return p * bits_as_float(uint32_t(int32_t(n) + 127) << 23);
}

// Component k at noise level sigma: inv_var[k*D+d] = 1/(s_kd^2 + sigma^2) and
// lognorm[k] = log w_k - 1/2 sum_d log(2 pi (s_kd^2 + sigma^2)).
template <class C>
DK_HD void gmm_component_constants(const C* weights, const C* stds, int k, int D, C sigma, C* inv_var, C* lognorm) {
  C acc = dk_log<C>(weights[k]);
  for (int d = 0; d < D; ++d) {
    const C s = stds[k * D + d];
    const C var = s * s + sigma * sigma;
    inv_var[k * D + d] = C(1) / var;
    acc -= C(0.5) * dk_log<C>(C(6.283185307179586476925286766559) * var);
  }
  lognorm[k] = acc;
}

// The terms of score(x) = sum_k r_k (mu_k - x) / var_k, r = softmax_k(lp_k),
// lp_k = lognorm_k - 1/2 q_k, q_k = sum_d (mu_kd - x_d)^2 / var_kd (summed in d order).
template <class C>
DK_HD C gmm_quad_term(C mu, C x, C inv_var) {
  const C diff = mu - x;
  return diff * diff * inv_var;
}
template <class C>
DK_HD C gmm_log_weight(C lognorm, C q) { return lognorm - C(0.5) * q; }
template <class C>
DK_HD C gmm_pull(C w, C mu, C x, C inv_var) { return w * (mu - x) * inv_var; }

// Two passes: the largest lp_k, then w_k = exp(lp_k - max). A component of weight 0 has
// lp_k = -inf and adds exp(-inf) = 0. (A streaming log-sum-exp rescales by
// exp(max_old - lp_k), which is exp(-inf + inf) = NaN while only such components have
// been seen: the NaN this replaced.) Pass 2 recomputes q_k rather than keeping K values
// per point: the same operations, so the same lp_k.
template <class C>
DK_HD C gmm_lp(const C* x, int D, int k, const C* means, const C* inv_var, const C* lognorm) {
  C q = C(0);
  for (int d = 0; d < D; ++d) q += gmm_quad_term<C>(means[k * D + d], x[d], inv_var[k * D + d]);
  return gmm_log_weight<C>(lognorm[k], q);
}

template <class C>
DK_HD void gmm_score_point(const C* x, int D, int K, const C* means, const C* inv_var, const C* lognorm, C* score) {
  C mx = C(-__builtin_huge_val());
  for (int k = 0; k < K; ++k) {
    const C lp = gmm_lp<C>(x, D, k, means, inv_var, lognorm);
    mx = lp > mx ? lp : mx;
  }
  C denom = C(0);
  C acc[kGmmMaxDim];
  for (int d = 0; d < D; ++d) acc[d] = C(0);
  for (int k = 0; k < K; ++k) {
    const C w = dk_exp<C>(gmm_lp<C>(x, D, k, means, inv_var, lognorm) - mx);
    denom += w;
    for (int d = 0; d < D; ++d) acc[d] += gmm_pull<C>(w, means[k * D + d], x[d], inv_var[k * D + d]);
  }
  for (int d = 0; d < D; ++d) score[d] = acc[d] / denom;
}

// The normals of point p at chain step `step`: logical indices step*numel + p*D + d.
DK_HD void gmm_step_noise(PhiloxKey key, uint64_t step, uint64_t numel, uint64_t p, int D, float* z) {
  const uint64_t base = step * numel + p * uint64_t(D);
  uint64_t g = base >> 2;
  Float4 q = philox_normal4(key, g);
  for (int d = 0; d < D; ++d) {
    const uint64_t idx = base + uint64_t(d);
    if ((idx >> 2) != g) {
      g = idx >> 2;
      q = philox_normal4(key, g);
    }
    z[d] = q.v[idx & 3];
  }
}

// One Langevin step of one point (same operation order as reference._gmm_loop).
template <class C>
DK_HD void gmm_langevin_update(C* x, const C* score, const float* z, int D, C alpha, C noise_scale) {
  for (int d = 0; d < D; ++d) x[d] = (x[d] + alpha * score[d]) + noise_scale * C(z[d]);
}

}  // namespace diffkern
