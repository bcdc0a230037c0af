// The sampler-family steps as functors (Euler / Euler ancestral / churn, Heun's second
// stage, DPM-Solver++(2M), flow-matching Euler, flow q_sample, LCM): per-sample
// coefficients formed in double once per sample (`coeffs<S>(b)`) and the per-element
// update (`apply`). The CPU loops (csrc/torch/cpu/driver.h) and the CUDA kernels
// (elementwise.cuh) drive these; the formulas are SAMPLER_SEMANTICS.md's, and
// diffkern/reference_samplers.py writes them the way k-diffusion and diffusers do.
//
// The driver interface (also met by the older ops through SampleStep in driver.h):
//   kInputs       tensor inputs read per element: in0 = x, then up to three more
//   kOutputs      values written per element: 1, or 2 (the step and its denoised sample)
//   kWritesNoise  the second output is the noise used (q_sample-like)
//   Coeffs<C>     per-sample coefficients; Coeffs<C>::from(Coeffs<double>) rounds them
//   apply<kHasZ>(k, in0..in3, z, out0, out1)
// Inputs an op does not read are passed as 0; z is 0 (and kHasZ false) without noise.
#pragma once
#include "schedule.h"
#include "step_ops.h"

namespace diffkern {

// A scalar of the step: a Python number (`value`), or a float32/float64 array of length 1
// or B on the op's device (per-sample schedules; read in the kernel, so no host sync).
struct SampleScalar {
  const void* data = nullptr;
  int64_t n = 1;
  bool is_double = false;
  double value = 0;

  DK_HD double at(int64_t b) const {
    if (!data) return value;
    const int64_t i = n == 1 ? 0 : b;
    return is_double ? static_cast<const double*>(data)[i] : double(static_cast<const float*>(data)[i]);
  }
  DK_HD bool per_sample() const { return data != nullptr && n > 1; }
  // Entries a and b hold the same value (a NaN never does): coefficients formed for one
  // serve the other (per-token levels repeat a frame's value over its tokens).
  DK_HD bool same(int64_t a, int64_t b) const { return !per_sample() || at(a) == at(b); }
};

template <class C>
DK_HD C dk_log(C v);
template <>
DK_HD double dk_log<double>(double v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return __builtin_log(v);
#endif
}

DK_HD double dk_expm1(double v) {
#if defined(__CUDA_ARCH__)
  return ::expm1(v);
#else
  return __builtin_expm1(v);
#endif
}

DK_HD double min_d(double a, double b) { return b < a ? b : a; }

// denoised = pa x + pb m in k-diffusion's VE parameterisation (x = x0 + sigma eps):
// "sample" m; "epsilon" x - sigma m; "v_prediction" m (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1)
// (k-diffusion's DiscreteVDDPMDenoiser: c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)).
struct DenoisedCoeffs {
  double pa, pb;
};
DK_HD DenoisedCoeffs ve_denoised_coeffs(int prediction, double sigma) {
  if (prediction == kEpsilon) return {1.0, -sigma};
  if (prediction == kVPrediction) {
    const double s2 = sigma * sigma + 1.0;
    return {1.0 / s2, -sigma / dk_sqrt<double>(s2)};
  }
  return {0.0, 1.0};
}

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

// ---- flow-matching Euler (diffusers FlowMatchEulerDiscreteScheduler) ------------------
//   deterministic: x + (sigma_next - sigma) v
//   stochastic:    x0 = x - sigma v; (1 - sigma_next) x0 + sigma_next z
struct FlowOp {
  static constexpr int kInputs = 2;
  static constexpr int kOutputs = 1;
  static constexpr bool kWritesNoise = false;
  SampleScalar sigma, sigma_next;
  bool stochastic;

  template <class C>
  struct Coeffs {
    C dt, s, keep, std;
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) { return {C(s.dt), C(s.s), C(s.keep), C(s.std)}; }
  };
  DK_HD bool uses_noise() const { return stochastic; }
  DK_HD bool per_sample() const { return sigma.per_sample() || sigma_next.per_sample(); }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return sigma.same(a, b) && sigma_next.same(a, b); }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const double s = sigma.at(b), sn = sigma_next.at(b);
    const Coeffs<double> k{sn - s, s, 1.0 - sn, sn};
    return Coeffs<S>::from(k);
  }
  // The bindings pass noise exactly when the step is stochastic, so kHasZ (a compile-time
  // switch) picks the form; a test of the member inside the loop cost a third of the speed.
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C v, C, C, C z, C& out, C&) const {
    if (kHasZ) {
      const C x0 = x - k.s * v;
      out = k.keep * x0 + k.std * z;
    } else {
      out = x + k.dt * v;
    }
  }
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    j[0] = stochastic ? k.keep : S(1);
    j[1] = stochastic ? -k.keep * k.s : k.dt;
    j[2] = S(0);
    j[3] = S(0);
    j[4] = stochastic ? k.std : S(0);
  }
};

// x_t = (1 - sigma) x0 + sigma z (rectified flow); the drawn z is written out too.
struct FlowQSampleOp {
  static constexpr int kInputs = 1;
  static constexpr int kOutputs = 1;
  static constexpr bool kWritesNoise = true;
  SampleScalar sigma;

  template <class C>
  struct Coeffs {
    C keep, s;
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) { return {C(s.keep), C(s.s)}; }
  };
  DK_HD bool uses_noise() const { return true; }
  DK_HD bool per_sample() const { return sigma.per_sample(); }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return sigma.same(a, b); }

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const double s = sigma.at(b);
    const Coeffs<double> k{1.0 - s, s};
    return Coeffs<S>::from(k);
  }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x0, C, C, C, C z, C& out, C&) const {
    out = k.keep * x0 + k.s * z;
  }
  template <class S>
  DK_HD void jacobian(int64_t b, S* j) const {
    const Coeffs<S> k = coeffs<S>(b);
    j[0] = k.keep;
    j[1] = S(0);
    j[2] = S(0);
    j[3] = S(0);
    j[4] = k.s;
  }
};

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

constexpr int kJacobianWidth = 5;  // d/d (in0, in1, in2, in3, z) per output row

}  // namespace diffkern

namespace diffkern {

// ---- linear_step: the multistep / multistage solvers' update --------------------------
//   out_o = sum_{j < nin} c[o][j] in_j  (+ cn[o] z where cn[o] != 0),   o < nout
// Every DPM-Solver(++)/UniPC/PLMS/LMS/iPNDM/DEIS step and every stage of DPM2 / DPM++ 2S /
// DPM++ SDE is this once its scalars are known; the callers (diffkern/samplers, the
// diffusers drop-ins) form the coefficients in double on the host from host sigmas, so
// the functor holds no solver math. Coefficients: `shared` (nout rows of nin + 1 values,
// the noise coefficient last) or, per sample, a double table on the op's device with
// `rows` (1 or B) such rows, read in the kernel.
constexpr int kMaxLinearInputs = 6;
constexpr int kMaxLinearOutputs = 3;

struct LinearOp {
  static constexpr int kInputs = kMaxLinearInputs;
  static constexpr int kOutputs = kMaxLinearOutputs;
  static constexpr bool kWritesNoise = false;
  static constexpr bool kArrayApply = true;  // apply(k, in[], z, out[]): see ApplyOp
  int nin = 1, nout = 1;
  double shared[kMaxLinearOutputs * (kMaxLinearInputs + 1)] = {};
  const double* table = nullptr;
  int64_t rows = 1;

  template <class C>
  struct Coeffs {
    C c[kMaxLinearOutputs][kMaxLinearInputs];
    C cn[kMaxLinearOutputs];
    template <class S>
    static DK_HD Coeffs from(const Coeffs<S>& s) {
      Coeffs k;
      for (int o = 0; o < kMaxLinearOutputs; ++o) {
        for (int j = 0; j < kMaxLinearInputs; ++j) k.c[o][j] = C(s.c[o][j]);
        k.cn[o] = C(s.cn[o]);
      }
      return k;
    }
  };
  DK_HD bool per_sample() const { return table != nullptr && rows > 1; }
  DK_HD bool same_levels(int64_t, int64_t) const { return !per_sample(); }  // rows are not compared

  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const {
    const int w = nin + 1;
    const double* row = table ? table + (rows == 1 ? 0 : b) * int64_t(nout) * w : shared;
    Coeffs<S> k;
    for (int o = 0; o < kMaxLinearOutputs; ++o) {
      for (int j = 0; j < kMaxLinearInputs; ++j) k.c[o][j] = o < nout && j < nin ? S(row[o * w + j]) : S(0);
      k.cn[o] = o < nout ? S(row[o * w + nin]) : S(0);
    }
    return k;
  }
  // N inputs present, NO outputs computed (compile-time in the CPU loops; the CUDA driver
  // passes the maxima). Summed left to right as the reference sums (bitwise the same). The
  // scalar form is what the CPU loop vectorizes; the array form serves the other drivers.
  template <bool kHasZ, int N, class C>
  DK_HD C row(const Coeffs<C>& k, int o, C a0, C a1, C a2, C a3, C a4, C a5, C z) const {
    C acc = k.c[o][0] * a0;
    if (N > 1) acc = acc + k.c[o][1] * a1;
    if (N > 2) acc = acc + k.c[o][2] * a2;
    if (N > 3) acc = acc + k.c[o][3] * a3;
    if (N > 4) acc = acc + k.c[o][4] * a4;
    if (N > 5) acc = acc + k.c[o][5] * a5;
    // a select, not 0 * z: a sample whose noise coefficient is 0 takes no noise term
    if (kHasZ) acc = k.cn[o] != C(0) ? acc + k.cn[o] * z : acc;
    return acc;
  }
  template <bool kHasZ, int N, int NO, class C>
  DK_HD void apply_n(const Coeffs<C>& k, C a0, C a1, C a2, C a3, C a4, C a5, C z, C& r0, C& r1, C& r2) const {
    r0 = row<kHasZ, N>(k, 0, a0, a1, a2, a3, a4, a5, z);
    if (NO > 1) r1 = row<kHasZ, N>(k, 1, a0, a1, a2, a3, a4, a5, z);
    if (NO > 2) r2 = row<kHasZ, N>(k, 2, a0, a1, a2, a3, a4, a5, z);
  }
  template <bool kHasZ, int N, int NO, class C>
  DK_HD void apply(const Coeffs<C>& k, const C* a, C z, C* r) const {
    C r1 = C(0), r2 = C(0);
    apply_n<kHasZ, N, NO, C>(k, a[0], N > 1 ? a[1] : C(0), N > 2 ? a[2] : C(0), N > 3 ? a[3] : C(0),
                             N > 4 ? a[4] : C(0), N > 5 ? a[5] : C(0), z, r[0], r1, r2);
    if (NO > 1) r[1] = r1;
    if (NO > 2) r[2] = r2;
  }
};

// The drivers call every functor through this: the array form of LinearOp, or the
// positional form (x, in1..in3, z -> out0, out1) of the fixed-arity ops.
template <class Op, class = void>
struct HasArrayApply {
  static constexpr bool value = false;
};
template <class Op>
struct HasArrayApply<Op, decltype(void(Op::kArrayApply))> {
  static constexpr bool value = Op::kArrayApply;
};

template <bool kHasZ, int N, int NO, class Op, class K, class C>
DK_HD void apply_op(const Op& op, const K& k, const C* a, C z, C* r) {
  if constexpr (HasArrayApply<Op>::value) {
    op.template apply<kHasZ, N, NO, C>(k, a, z, r);
  } else {
    op.template apply<kHasZ, C>(k, a[0], N > 1 ? a[1] : C(0), N > 2 ? a[2] : C(0), N > 3 ? a[3] : C(0), z, r[0],
                                r[1]);
  }
}

}  // namespace diffkern
