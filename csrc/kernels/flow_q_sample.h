// flow_q_sample: the rectified-flow noising of training. The functor both drivers run (op_base.h);
// its CUDA kernel is flow_q_sample.cu, its bindings csrc/torch/cpu/flow_q_sample.cpp and
// csrc/torch/cuda/flow_q_sample.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

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

}  // namespace diffkern
