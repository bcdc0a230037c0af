// Per-sample coefficients of the step ops, from the alphas_cumprod table and t / t_prev.
// Every step is `out = c0 x0 + c1 eps + c2 x + std z` with x0 = a0 x + b0 m and
// eps = a1 x + b1 m (m: the model output). The forms avoid the cancellations of the
// textbook ones: 1 - ab/ab' is (ab' - ab)/ab' (a difference of nearby table entries is
// exact), 1 - ab' - std^2 is a sum of non-negative terms. diffkern/reference.py
// (step_coefficients) evaluates the same expressions in the same order.
#pragma once
#include "common.h"

namespace diffkern {

enum PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum VarianceType : int { kFixedSmall = 0, kFixedLarge = 1 };

template <class C>
struct StepCoeffs {
  C a0, b0, a1, b1, c0, c1, c2, std;
};

// alphas_cumprod[t]; 1 for t < 0 when allow_final (t_prev < 0 is the last step); NaN for
// an index outside the table (only reachable with device-resident t, never checked on
// the host) so a bad t shows up in the output instead of reading out of bounds.
template <class C>
DK_HD C table_lookup(const float* table, int64_t T, int64_t t, bool allow_final) {
  if (t < 0 && allow_final) return C(1);
  if (t < 0 || t >= T) return C(__builtin_nan(""));
  return C(table[t]);
}

DK_HD int64_t timestep_of(const int64_t* t, int64_t nt, int64_t b) { return t[nt == 1 ? 0 : b]; }

template <class C>
DK_HD void prediction_coeffs(C ab, int prediction, StepCoeffs<C>& k) {
  const C sa = dk_sqrt<C>(ab), s1a = dk_sqrt<C>(C(1) - ab);
  if (prediction == kEpsilon && !(ab > C(0))) {
    // Epsilon prediction at a zero terminal SNR divides by sqrt(ab) = 0; rejected on the
    // host when t is readable there, NaN here (a device t is never read back), never an
    // inf that clip_sample would clamp into a finite, wrong sample.
    k.a0 = k.b0 = k.a1 = k.b1 = C(__builtin_nan(""));
  } else if (prediction == kEpsilon) {
    k.a0 = C(1) / sa; k.b0 = -s1a / sa; k.a1 = C(0); k.b1 = C(1);
  } else if (prediction == kSample) {
    k.a0 = C(0); k.b0 = C(1); k.a1 = C(1) / s1a; k.b1 = -sa / s1a;
  } else {
    k.a0 = sa; k.b0 = -s1a; k.a1 = s1a; k.b1 = sa;
  }
}

template <class C>
DK_HD C max0(C v) { return v < C(0) ? C(0) : v; }  // NaN passes, as clamp_min does

template <class C>
DK_HD StepCoeffs<C> ddim_coeffs(C ab, C abp, C eta, int prediction) {
  StepCoeffs<C> k;
  prediction_coeffs(ab, prediction, k);
  const C beta = (abp - ab) / abp;
  const C r = (C(1) - abp) / (C(1) - ab);
  const C var = r * beta;
  k.std = eta * dk_sqrt<C>(max0(var));
  const C dir2 = r * ((C(1) - eta * eta) * (C(1) - ab) + eta * eta * ab * (C(1) - abp) / abp);
  k.c0 = dk_sqrt<C>(abp);
  k.c1 = dk_sqrt<C>(max0(dir2));
  k.c2 = C(0);
  return k;
}

template <class C>
DK_HD StepCoeffs<C> ddpm_coeffs(C ab, C abp, int64_t t, int variance, int prediction) {
  StepCoeffs<C> k;
  prediction_coeffs(ab, prediction, k);
  const C beta = (abp - ab) / abp;
  const C r = (C(1) - abp) / (C(1) - ab);
  k.c0 = dk_sqrt<C>(abp) * beta / (C(1) - ab);
  k.c2 = dk_sqrt<C>(ab / abp) * r;
  k.c1 = C(0);
  C var = variance == kFixedSmall ? r * beta : beta;
  if (variance == kFixedSmall && var < C(1e-20)) var = C(1e-20);
  k.std = t > 0 ? dk_sqrt<C>(var) : C(0);  // no noise on the last step
  return k;
}

template <class C, class S>
DK_HD StepCoeffs<C> cast_coeffs(const StepCoeffs<S>& s) {
  return StepCoeffs<C>{C(s.a0), C(s.b0), C(s.a1), C(s.b1), C(s.c0), C(s.c1), C(s.c2), C(s.std)};
}

// The shared update of DDIM and DDPM (same operation order as reference._apply_step).
template <class C>
DK_HD C step_apply(const StepCoeffs<C>& k, C x, C m, C z, bool has_z, bool has_clip, C clip) {
  C x0 = k.a0 * x + k.b0 * m;
  if (has_clip) x0 = clamp_abs(x0, clip);
  C out = k.c0 * x0 + k.c1 * (k.a1 * x + k.b1 * m) + k.c2 * x;
  if (has_z) out = out + k.std * z;
  return out;
}

// d out / d x and d out / d m, times the incoming gradient g. clamp passes the gradient
// where -c <= x0 <= c (torch.clamp's convention).
template <class C>
DK_HD void step_backward(const StepCoeffs<C>& k, C x, C m, C g, bool has_clip, C clip, C* gx, C* gm) {
  C pass = C(1);
  if (has_clip) {
    const C x0 = k.a0 * x + k.b0 * m;
    pass = (x0 >= -clip && x0 <= clip) ? C(1) : C(0);
  }
  *gx = g * (k.c0 * pass * k.a0 + k.c1 * k.a1 + k.c2);
  *gm = g * (k.c0 * pass * k.b0 + k.c1 * k.b1);
}

}  // namespace diffkern
