// The elementwise step ops as functors: per-sample coefficients (`coeffs<S>(b)`) and the
// per-element update (`apply`). The CPU loops (csrc/torch/cpu) and the CUDA kernels
// (elementwise.cuh) both drive these; nothing here knows about either.
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

struct DdimOp {
  static constexpr bool kHasModel = true;
  static constexpr bool kWritesNoise = false;
  TimestepArgs ts;
  double eta;
  int prediction;
  bool has_clip;
  double clip;

  DK_HD bool same_levels(int64_t a, int64_t b) const { return ts.same(a, b); }
  template <class S>
  DK_HD StepCoeffs<S> coeffs(int64_t b) const {
    const int64_t t = ts.t_at(b);
    const S ab = table_lookup<S>(ts.table, ts.num_timesteps, t, false);
    const S abp = table_lookup<S>(ts.table, ts.num_timesteps, ts.t_prev_at(b, t), true);
    return ddim_coeffs<S>(ab, abp, S(eta), prediction);
  }
  template <class C>
  DK_HD C apply(const StepCoeffs<C>& k, C x, C m, C z, bool has_z) const {
    return step_apply<C>(k, x, m, z, has_z, has_clip, C(clip));
  }
};

struct DdpmOp {
  static constexpr bool kHasModel = true;
  static constexpr bool kWritesNoise = false;
  TimestepArgs ts;
  int variance;
  int prediction;
  bool has_clip;
  double clip;

  DK_HD bool same_levels(int64_t a, int64_t b) const { return ts.same(a, b); }
  template <class S>
  DK_HD StepCoeffs<S> coeffs(int64_t b) const {
    const int64_t t = ts.t_at(b);
    const S ab = table_lookup<S>(ts.table, ts.num_timesteps, t, false);
    const S abp = table_lookup<S>(ts.table, ts.num_timesteps, ts.t_prev_at(b, t), true);
    return ddpm_coeffs<S>(ab, abp, t, variance, prediction);
  }
  template <class C>
  DK_HD C apply(const StepCoeffs<C>& k, C x, C m, C z, bool has_z) const {
    return step_apply<C>(k, x, m, z, has_z, has_clip, C(clip));
  }
};

// x_t = sqrt(ab) x0 + sqrt(1 - ab) z; the drawn z is written out too (it is the
// training target).
struct QSampleOp {
  static constexpr bool kHasModel = false;
  static constexpr bool kWritesNoise = true;
  TimestepArgs ts;

  DK_HD bool same_levels(int64_t a, int64_t b) const { return ts.same(a, b); }
  template <class S>
  DK_HD StepCoeffs<S> coeffs(int64_t b) const {
    const S ab = table_lookup<S>(ts.table, ts.num_timesteps, ts.t_at(b), false);
    StepCoeffs<S> k{};
    k.c0 = dk_sqrt<S>(ab);
    k.std = dk_sqrt<S>(S(1) - ab);
    return k;
  }
  template <class C>
  DK_HD C apply(const StepCoeffs<C>& k, C x, C, C z, bool) const {
    return k.c0 * x + k.std * z;
  }
};

// x + a s + sqrt(2 a) z (NCSN code convention).
struct LangevinOp {
  static constexpr bool kHasModel = true;
  static constexpr bool kWritesNoise = false;
  double step_size;

  DK_HD bool same_levels(int64_t, int64_t) const { return true; }
  template <class S>
  DK_HD StepCoeffs<S> coeffs(int64_t) const {
    StepCoeffs<S> k{};
    k.c1 = S(step_size);
    k.std = S(dk_sqrt<double>(2.0 * step_size));
    return k;
  }
  template <class C>
  DK_HD C apply(const StepCoeffs<C>& k, C x, C s, C z, bool has_z) const {
    C out = x + k.c1 * s;
    if (has_z) out = out + k.std * z;
    return out;
  }
};

// The older step ops (DdimOp, DdpmOp, QSampleOp, LangevinOp: one StepCoeffs, x and m in,
// one value out) seen through the driver interface of the sampler ops
// (sampler_ops.h): both drivers run every op through that one interface.
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
