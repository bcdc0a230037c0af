// q_sample: the forward noising of training. The functor both drivers run (op_base.h); its CUDA
// kernel is q_sample.cu, its bindings csrc/torch/cpu/q_sample.cpp and
// csrc/torch/cuda/q_sample.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

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

}  // namespace diffkern
