// flow_step: the flow-matching Euler step. The functor both drivers run (op_base.h); its CUDA
// kernel is flow_step.cu, its bindings csrc/torch/cpu/flow_step.cpp and
// csrc/torch/cuda/flow_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

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

}  // namespace diffkern
