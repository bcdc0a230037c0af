// ddim_step: DDIM (Song et al. 2021; diffusers DDIMScheduler.step). The functor both drivers run
// (op_base.h); its CUDA kernel is ddim.cu, its bindings csrc/torch/cpu/ddim.cpp and
// csrc/torch/cuda/ddim.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

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

}  // namespace diffkern
