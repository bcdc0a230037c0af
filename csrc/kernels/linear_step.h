// linear_step: the multistep / multistage solvers' fused update. The functor both drivers run
// (op_base.h); its CUDA kernel is linear_step.cu, its bindings csrc/torch/cpu/linear_step.cpp and
// csrc/torch/cuda/linear_step.cpp.
#pragma once
#include "op_base.h"

namespace diffkern {

// ---- linear_step: the multistep / multistage solvers' update --------------------------
//   out_o = sum_{j < nin} c[o][j] in_j  (+ cn[o] z where cn[o] != 0),   o < nout
// Every DPM-Solver(++)/UniPC/PLMS/LMS/iPNDM/DEIS step and every stage of DPM2 / DPM++ 2S /
// DPM++ SDE is this once its scalars are known; the callers (diffkern/samplers, the
// diffusers drop-ins) form the coefficients in double on the host from host sigmas, so
// the functor holds no solver math. Coefficients: `shared` (nout rows of nin + 1 values,
// the noise coefficient last) or, per sample, a double table on the op's device with
// `rows` (1 or B) such rows, read in the kernel.

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

}  // namespace diffkern
