// euler_step: Euler, ancestral and churn. The functor both drivers run (op_base.h); its CUDA
// kernel is euler_step.cu, its bindings csrc/torch/cpu/euler_step.cpp and
// csrc/torch/cuda/euler_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

// ---- Euler (k-diffusion sample_euler / sample_euler_ancestral; diffusers' churn) -------
//   xh  = x + kz z                         (churn: kz = s_noise sqrt(sigma_hat^2 - sigma^2))
//   den = pa xh + pb m
//   out = xh + (xh - den) c + kn z         (c = (sigma_target - sigma_hat)/sigma_hat;
//                                           ancestral: target sigma_down, kn = s_noise sigma_up)
struct EulerOp {
  static constexpr int kInputs = 2;
  static constexpr int kOutputs = 1;
  static constexpr bool kWritesNoise = false;
  SampleScalar sigma, sigma_next;
  double eta, s_noise, gamma;
  int prediction;

  template <class C>
  struct Coeffs {
    C pa, pb, c, kz, kn;
    bool noise_term;  // ancestral rows with sigma_next > 0 (k-diffusion adds no noise at sigma 0)
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) {
      return {C(s.pa), C(s.pb), C(s.c), C(s.kz), C(s.kn), s.noise_term};
    }
  };
  DK_HD bool uses_noise() const { return eta > 0 || gamma > 0; }
  DK_HD bool per_sample() const { return sigma.per_sample() || sigma_next.per_sample(); }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return sigma.same(a, b) && sigma_next.same(a, b); }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const double s = sigma.at(b), sn = sigma_next.at(b);
    Coeffs<double> k{0, 0, 0, 0, 0, false};
    if (gamma > 0) {
      const double sh = s * (1.0 + gamma);
      // diffusers forms x0 with sigma_hat for epsilon but with sigma for v_prediction
      const DenoisedCoeffs d = ve_denoised_coeffs(prediction, prediction == kVPrediction ? s : sh);
      // sqrt(sh^2 - s^2) = s sqrt(gamma (gamma + 2)): no cancellation at small gamma
      k = {d.pa, d.pb, (sn - sh) / sh, s_noise * s * dk_sqrt<double>(gamma * (gamma + 2.0)), 0.0, false};
    } else if (eta > 0) {
      // get_ancestral_step: sigma_up = min(sn, eta sqrt(sn^2 (s^2 - sn^2)/s^2))
      const double up = min_d(sn, eta * dk_sqrt<double>(max0(sn * sn * (s * s - sn * sn) / (s * s))));
      const double down = dk_sqrt<double>(max0(sn * sn - up * up));
      const DenoisedCoeffs d = ve_denoised_coeffs(prediction, s);
      k = {d.pa, d.pb, (down - s) / s, 0.0, sn > 0 ? s_noise * up : 0.0, sn > 0};
    } else {
      const DenoisedCoeffs d = ve_denoised_coeffs(prediction, s);
      k = {d.pa, d.pb, (sn - s) / s, 0.0, 0.0, false};
    }
    return Coeffs<S>::from(k);
  }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C m, C, C, C z, C& out, C&) const {
    // Each noise term only where the step has it (a select, not 0 * z: a non-finite z must
    // not reach a sample that takes no noise, as in the reference).
    const C xh = kHasZ && gamma > 0 ? x + k.kz * z : x;
    const C den = k.pa * xh + k.pb * m;
    out = xh + (xh - den) * k.c;
    if (kHasZ) out = k.noise_term ? out + k.kn * z : out;
  }
  // d out / d (x, m, -, -, z): the step is linear in its inputs.
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    const S dxh = S(1) + k.c - k.c * k.pa;  // d out / d xh
    j[0] = dxh;
    j[1] = -k.c * k.pb;
    j[2] = S(0);
    j[3] = S(0);
    j[4] = dxh * k.kz + k.kn;
  }
};

}  // namespace diffkern
