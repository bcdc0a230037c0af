// lcm_step: the LCM step and its backward. The functor both drivers run (op_base.h); its CUDA
// kernel is lcm_step.cu, its bindings csrc/torch/cpu/lcm_step.cpp and
// csrc/torch/cuda/lcm_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

// ---- LCM (diffusers LCMScheduler.step) ---------------------------------------------
//   c_skip = sd^2/((t ts)^2 + sd^2), c_out = t ts/sqrt((t ts)^2 + sd^2)
//   x0 from m as DDIM's forms (clipped if asked); den = c_out x0 + c_skip x
//   out = sqrt(ab') den + sqrt(1 - ab') z; t_prev < 0: out = den.
struct LcmOp {
  static constexpr int kInputs = 2;
  static constexpr int kOutputs = 2;
  static constexpr bool kWritesNoise = false;
  TimestepArgs ts;  // t_prev required
  double timestep_scaling, sigma_data;
  int prediction;
  bool has_clip;
  double clip;
  bool noise;  // some row re-noises (t_prev >= 0)

  template <class C>
  struct Coeffs {
    C a0, b0, c_out, c_skip, c0, std;
    bool renoise;  // t_prev >= 0: the final step is the denoised sample, whatever z is
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) {
      return {C(s.a0), C(s.b0), C(s.c_out), C(s.c_skip), C(s.c0), C(s.std), s.renoise};
    }
  };
  DK_HD bool uses_noise() const { return noise; }
  DK_HD bool per_sample() const { return ts.nt > 1; }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return ts.same(a, b); }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const int64_t t = ts.t_at(b), tp = ts.t_prev_at(b, t);
    const double ab = table_lookup<double>(ts.table, ts.num_timesteps, t, false);
    StepCoeffs<double> p;
    prediction_coeffs<double>(ab, prediction, p);
    const double scaled = double(t) * timestep_scaling, sd2 = sigma_data * sigma_data;
    const double q = scaled * scaled + sd2;
    Coeffs<double> k{p.a0, p.b0, scaled / dk_sqrt<double>(q), sd2 / q, 1.0, 0.0, tp >= 0};
    if (tp >= 0) {
      const double abp = table_lookup<double>(ts.table, ts.num_timesteps, tp, false);
      k.c0 = dk_sqrt<double>(abp);
      k.std = dk_sqrt<double>(1.0 - abp);
    }
    return Coeffs<S>::from(k);
  }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C m, C, C, C z, C& out, C& den_out) const {
    C x0 = k.a0 * x + k.b0 * m;
    if (has_clip) x0 = clamp_abs(x0, C(clip));
    const C den = k.c_out * x0 + k.c_skip * x;
    out = kHasZ && k.renoise ? k.c0 * den + k.std * z : k.c0 * den;
    den_out = den;
  }
  // Without clipping; with it, LcmBackwardOp passes the gradient where x0 is unclipped.
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    j[0] = k.c0 * (k.c_out * k.a0 + k.c_skip);
    j[1] = k.c0 * k.c_out * k.b0;
    j[2] = S(0);
    j[3] = S(0);
    j[4] = k.std;
    j[5] = k.c_out * k.a0 + k.c_skip;
    j[6] = k.c_out * k.b0;
    j[7] = S(0);
    j[8] = S(0);
    j[9] = S(0);
  }
};

// Backward of lcm_step with clip_sample: inputs (g, x, m, g_den), outputs (dL/dx, dL/dm);
// the clamp passes the gradient where -c <= x0 <= c (torch.clamp's convention).
struct LcmBackwardOp {
  static constexpr int kInputs = 4;
  static constexpr int kOutputs = 2;
  static constexpr bool kWritesNoise = false;
  LcmOp fwd;

  template <class C>
  using Coeffs = LcmOp::Coeffs<C>;
  DK_HD bool uses_noise() const { return false; }
  DK_HD bool per_sample() const { return fwd.per_sample(); }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return fwd.same_levels(a, b); }
  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const { return fwd.coeffs<S>(b); }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C g, C x, C m, C g_den, C, C& gx, C& gm) const {
    const C x0 = k.a0 * x + k.b0 * m;
    const C pass = (!fwd.has_clip || (x0 >= -C(fwd.clip) && x0 <= C(fwd.clip))) ? C(1) : C(0);
    const C gd = k.c0 * g + g_den;  // dL/d den
    gx = gd * (k.c_out * pass * k.a0 + k.c_skip);
    gm = gd * (k.c_out * pass * k.b0);
  }
};

}  // namespace diffkern
