// heun_step: Heun's second stage. The functor both drivers run (op_base.h); its CUDA kernel is
// heun_step.cu, its bindings csrc/torch/cpu/heun_step.cpp and csrc/torch/cuda/heun_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

// ---- Heun's second stage (k-diffusion sample_heun) ----------------------------------
//   d = (x - den)/sigma, d2 = (x_proposal - den2)/sigma_next (den2 formed at sigma_next),
//   out = x + (d + d2)/2 (sigma_next - sigma)
struct HeunOp {
  static constexpr int kInputs = 4;
  static constexpr int kOutputs = 1;
  static constexpr bool kWritesNoise = false;
  SampleScalar sigma, sigma_next;
  int prediction;

  template <class C>
  struct Coeffs {
    C pa, pb, pa2, pb2, inv_s, inv_sn, half_dt;
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) {
      return {C(s.pa), C(s.pb), C(s.pa2), C(s.pb2), C(s.inv_s), C(s.inv_sn), C(s.half_dt)};
    }
  };
  DK_HD bool uses_noise() const { return false; }
  DK_HD bool per_sample() const { return sigma.per_sample() || sigma_next.per_sample(); }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return sigma.same(a, b) && sigma_next.same(a, b); }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const double s = sigma.at(b), sn = sigma_next.at(b);
    const DenoisedCoeffs d = ve_denoised_coeffs(prediction, s), d2 = ve_denoised_coeffs(prediction, sn);
    const Coeffs<double> k{d.pa, d.pb, d2.pa, d2.pb, 1.0 / s, 1.0 / sn, (sn - s) / 2.0};
    return Coeffs<S>::from(k);
  }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C m, C xp, C mp, C, C& out, C&) const {
    const C den = k.pa * x + k.pb * m;
    const C den2 = k.pa2 * xp + k.pb2 * mp;
    out = x + ((x - den) * k.inv_s + (xp - den2) * k.inv_sn) * k.half_dt;
  }
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    j[0] = S(1) + (S(1) - k.pa) * k.inv_s * k.half_dt;
    j[1] = -k.pb * k.inv_s * k.half_dt;
    j[2] = (S(1) - k.pa2) * k.inv_sn * k.half_dt;
    j[3] = -k.pb2 * k.inv_sn * k.half_dt;
    j[4] = S(0);
  }
};

}  // namespace diffkern
