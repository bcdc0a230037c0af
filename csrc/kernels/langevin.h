// langevin_step: one unadjusted Langevin step. The functor both drivers run (op_base.h); its CUDA
// kernel is langevin.cu, its bindings csrc/torch/cpu/langevin.cpp and
// csrc/torch/cuda/langevin.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

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

}  // namespace diffkern
