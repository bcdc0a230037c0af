// What every elementwise op's functor (one header per op, <op>.h beside its CUDA kernel
// <op>.cu; ops.h includes them all) builds on: per-sample coefficients formed in double
// once per level entry (`coeffs<S>(b)`) and the per-element update (`apply`). The CPU loops
// (csrc/torch/cpu/driver.h) and the CUDA kernels (elementwise.cuh) drive them; nothing
// here knows about either. The formulas are REFERENCE_SEMANTICS.md's and
// SAMPLER_SEMANTICS.md's; diffkern/reference.py and reference_samplers.py write them the
// way the papers, k-diffusion and diffusers do.
//
// The driver interface (met by the older step ops through SampleStep, below):
//   kInputs       tensor inputs read per element: in0 = x, then up to three more
//   kOutputs      values written per element: 1, or 2 (the step and its denoised sample)
//   kWritesNoise  the second output is the noise used (q_sample-like)
//   Coeffs<C>     per-sample coefficients; Coeffs<C>::from(Coeffs<double>) rounds them
//   apply<kHasZ>(k, in0..in3, z, out0, out1)
// Inputs an op does not read are passed as 0; z is 0 (and kHasZ false) without noise.
#pragma once
#include "schedule.h"

namespace diffkern {

struct TimestepArgs {
  const float* table;     // alphas_cumprod, float32, on the op's device
  int64_t num_timesteps;
  const int64_t* t;       // (nt,) int64: nt == 1 or the batch size
  const int64_t* t_prev;  // same length as t; < 0 means the final step; null: t - 1
  int64_t nt;

  DK_HD int64_t t_at(int64_t b) const { return timestep_of(t, nt, b); }
  // Entries a and b hold the same timesteps: coefficients formed for one serve the other.
  DK_HD bool same(int64_t a, int64_t b) const {
    return nt == 1 || (t[a] == t[b] && (!t_prev || t_prev[a] == t_prev[b]));
  }
  // A t_prev not below t (only reachable with device-resident timesteps: the host checks
  // the others) reads as an index outside the table, so the sample comes out NaN instead
  // of silently returning x.
  DK_HD int64_t t_prev_at(int64_t b, int64_t tb) const {
    if (!t_prev) return tb - 1;
    const int64_t tp = timestep_of(t_prev, nt, b);
    return tp < tb ? tp : num_timesteps;
  }
};


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

constexpr int kMaxLinearInputs = 6;
constexpr int kMaxLinearOutputs = 3;
constexpr int kJacobianWidth = 5;  // d/d (in0, in1, in2, in3, z) per output row

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


// The older step ops (DdimOp, DdpmOp, QSampleOp, LangevinOp: one StepCoeffs, x and m in,
// one value out) seen through the driver interface of the sampler ops
// (above): both drivers run every op through that one interface.
template <class Op>
struct SampleStep {
  static constexpr int kInputs = Op::kHasModel ? 2 : 1;
  static constexpr int kOutputs = 1;
  static constexpr bool kWritesNoise = Op::kWritesNoise;
  Op op;

  template <class C>
  struct Coeffs {
    StepCoeffs<C> k;
    template <class S>
    DK_HD static Coeffs from(const Coeffs<S>& s) { return {cast_coeffs<C>(s.k)}; }
  };
  template <class S>
  DK_HD Coeffs<S> coeffs(int64_t b) const { return {op.template coeffs<S>(b)}; }
  DK_HD bool same_levels(int64_t a, int64_t b) const { return op.same_levels(a, b); }
  template <bool kHasZ, class C>
  DK_HD void apply(const Coeffs<C>& k, C x, C m, C, C, C z, C& out, C&) const {
    out = op.apply(k.k, x, m, z, kHasZ);
  }
};

}  // namespace diffkern
