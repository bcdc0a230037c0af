// dpmpp_2m_step: DPM-Solver++(2M). The functor both drivers run (op_base.h); its CUDA kernel is
// dpmpp_2m_step.cu, its bindings csrc/torch/cpu/dpmpp_2m_step.cpp and
// csrc/torch/cuda/dpmpp_2m_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

// ---- DPM-Solver++(2M) (k-diffusion sample_dpmpp_2m; diffusers' DPMSolverMultistep) ----
// With t = -log sigma, h = t_next - t, r = (t - t_prev)/h:
//   first order / old absent: x' = (sn/s) x - expm1(-h) den
//   midpoint: den_d = (1 + 1/(2r)) den - 1/(2r) old
//   heun:     x' = (sn/s) x - expm1(-h) den + (expm1(-h)/h + 1)(den - old)/r
//   sigma_next = 0: x' = den.
// Written as out = A x + B den + D old. Variance preserving: x is x_ve/sqrt(sigma^2+1),
// den comes from m by diffusers' VP forms, and x'_vp = alpha_next x'_ve(x/alpha).
enum SolverType : int { kMidpoint = 0, kHeun = 1 };

struct DpmppOp {
  static constexpr int kInputs = 3;
  static constexpr int kOutputs = 2;
  static constexpr bool kWritesNoise = false;
  SampleScalar sigma, sigma_next, sigma_prev;
  int prediction;
  int solver;
  bool variance_preserving;
  bool has_old;  // old_denoised given (second order where sigma_next > 0)

  template <class C>
  struct Coeffs {
    C pa, pb, A, B, D;
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) { return {C(s.pa), C(s.pb), C(s.A), C(s.B), C(s.D)}; }
  };
  DK_HD bool uses_noise() const { return false; }
  DK_HD bool per_sample() const {
    return sigma.per_sample() || sigma_next.per_sample() || (has_old && sigma_prev.per_sample());
  }
  DK_HD bool same_levels(int64_t a, int64_t b) const {
    return sigma.same(a, b) && sigma_next.same(a, b) && (!has_old || sigma_prev.same(a, b));
  }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const double s = sigma.at(b), sn = sigma_next.at(b);
    Coeffs<double> k{0, 0, 0, 0, 0};
    double scale_in = 1.0, scale_out = 1.0;  // x_ve = x scale_in; x'_vp = x'_ve scale_out
    if (variance_preserving) {
      const double alpha = 1.0 / dk_sqrt<double>(s * s + 1.0);
      const double sigma_vp = s * alpha;
      if (prediction == kEpsilon) {
        k.pa = 1.0 / alpha;
        k.pb = -sigma_vp / alpha;
      } else if (prediction == kVPrediction) {
        k.pa = alpha;
        k.pb = -sigma_vp;
      } else {
        k.pa = 0.0;
        k.pb = 1.0;
      }
      scale_in = 1.0 / alpha;
      scale_out = 1.0 / dk_sqrt<double>(sn * sn + 1.0);
    } else {
      const DenoisedCoeffs d = ve_denoised_coeffs(prediction, s);
      k.pa = d.pa;
      k.pb = d.pb;
    }
    if (!(sn > 0)) {  // the final step lands on the denoised sample
      k.A = 0.0;
      k.B = 1.0;
      k.D = 0.0;
      return Coeffs<S>::from(k);
    }
    const double t = -dk_log<double>(s), tn = -dk_log<double>(sn);
    const double h = tn - t;
    const double em1 = dk_expm1(-h);
    double B = -em1, D = 0.0;
    if (has_old) {
      const double tp = -dk_log<double>(sigma_prev.at(b));
      const double r = (t - tp) / h;
      if (solver == kHeun) {
        const double c = (em1 / h + 1.0) / r;
        B += c;
        D = -c;
      } else {
        B = -em1 * (1.0 + 1.0 / (2.0 * r));
        D = em1 / (2.0 * r);
      }
    }
    k.A = (sn / s) * scale_in * scale_out;
    k.B = B * scale_out;
    k.D = D * scale_out;
    return Coeffs<S>::from(k);
  }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C m, C old, C, C, C& out, C& den_out) const {
    const C den = k.pa * x + k.pb * m;
    out = k.A * x + k.B * den + k.D * old;
    den_out = den;
  }
  // Rows: d out / d (x, m, old, -, z), then d den / d (...).
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    j[0] = k.A + k.B * k.pa;
    j[1] = k.B * k.pb;
    j[2] = k.D;
    j[3] = S(0);
    j[4] = S(0);
    j[5] = k.pa;
    j[6] = k.pb;
    j[7] = S(0);
    j[8] = S(0);
    j[9] = S(0);
  }
};

}  // namespace diffkern
