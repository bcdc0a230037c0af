// Binding helpers of the sampler-family ops (their levels: levels.h): each op's scalar
// arguments and levels checked and made its functor, one function per op, shared by its
// CPU and CUDA bindings and its jacobian. The tensor operands are validate::operands'.
// Translation and checks only; the math is csrc/kernels/<op>.h. The messages are
// those of the Python checks (diffkern/_validate.py, reference_samplers' _<op>_args).
#pragma once
#include "../kernels/ops.h"
#include "common.h"
#include "levels.h"
#include "validate.h"

namespace diffkern {

using OptTensor = std::optional<at::Tensor>;

inline EulerOp euler_op(LevelSet& lv, const OptTensor& st, const OptTensor& snt, double s, double sn, double eta,
                        double s_noise, double gamma, int64_t prediction) {
  validate::nonneg(eta, "eta");
  validate::nonneg(s_noise, "s_noise");
  validate::nonneg(gamma, "gamma");
  TORCH_CHECK_VALUE(!(eta > 0 && gamma > 0), "eta (ancestral noise) and gamma (churn) are exclusive; pass one of them");
  validate::prediction_type(prediction);
  const EulerOp op{lv.scalar(st, s, "sigma", Range::kPositive), lv.scalar(snt, sn, "sigma_next", Range::kNonneg), eta,
                   s_noise, gamma, int(prediction)};
  if (eta > 0) lv.order("sigma_next", "sigma", "sigma_next must be <= sigma for the ancestral step (eta > 0)", false);
  return op;
}

inline HeunOp heun_op(LevelSet& lv, const OptTensor& st, const OptTensor& snt, double s, double sn,
                      int64_t prediction) {
  validate::prediction_type(prediction);
  return HeunOp{lv.scalar(st, s, "sigma", Range::kPositive), lv.scalar(snt, sn, "sigma_next", Range::kPositive),
                int(prediction)};
}

// `spt` / `sp`: sigma_prev, used (and required) only with old_denoised (`has_old`).
inline DpmppOp dpmpp_2m_op(LevelSet& lv, const OptTensor& st, const OptTensor& snt, const OptTensor& spt, double s,
                           double sn, double sp, int64_t prediction, int64_t solver, bool vp, bool has_old) {
  validate::prediction_type(prediction);
  validate::solver_type(solver);
  const SampleScalar sigma = lv.scalar(st, s, "sigma", Range::kPositive);
  const SampleScalar sigma_next = lv.scalar(snt, sn, "sigma_next", Range::kNonneg);
  SampleScalar sigma_prev;
  if (has_old) {
    // the schema's number defaults to 0, which no valid sigma_prev (> sigma > 0) is
    TORCH_CHECK_VALUE(spt.has_value() || sp != 0.0,
                      "sigma_prev is required with old_denoised (the second-order step needs r = h_last/h)");
    sigma_prev = lv.scalar(spt, sp, "sigma_prev", Range::kPositive);
    lv.order("sigma", "sigma_prev", "sigma_prev must be > sigma (sigmas descend)", true);
    lv.order("sigma_next", "sigma", "sigma_next must be < sigma for the second-order step", true);
  }
  return DpmppOp{sigma, sigma_next, sigma_prev, int(prediction), int(solver), vp, has_old};
}

inline FlowOp flow_op(LevelSet& lv, const OptTensor& st, const OptTensor& snt, double s, double sn, bool stochastic) {
  return FlowOp{lv.scalar(st, s, "sigma", Range::kNonneg), lv.scalar(snt, sn, "sigma_next", Range::kNonneg),
                stochastic};
}

inline FlowQSampleOp flow_q_sample_op(LevelSet& lv, const OptTensor& st, double s) {
  return FlowQSampleOp{lv.scalar(st, s, "sigma", Range::kUnit)};
}

// t / t_prev: validate::timesteps' arrays (a binding) or host copies (the jacobian).
inline LcmOp lcm_op(LevelSet& lv, const at::Tensor& table, const at::Tensor& t, const at::Tensor& t_prev,
                    double timestep_scaling, double sigma_data, int64_t prediction, double clip, bool renoise) {
  validate::nonneg(timestep_scaling, "timestep_scaling");
  validate::positive(sigma_data, "sigma_data");
  validate::nonneg(clip, "clip_sample");
  validate::prediction_type(prediction);
  return LcmOp{timestep_args(table, lv.timesteps(t, "t"), lv.timesteps(t_prev, "t_prev")),
               timestep_scaling,
               sigma_data,
               int(prediction),
               clip > 0,
               clip,
               renoise};
}

}  // namespace diffkern

namespace diffkern {

// linear_step's coefficients -> LinearOp: `coeffs` (outputs rows of inputs + 1 numbers,
// the noise coefficient last) shared by the batch, or when `table` is given a contiguous
// float64 tensor (1 or B, outputs * (inputs + 1)) on x's device, read per sample.
inline LinearOp linear_op(int64_t nin, int64_t nout, c10::ArrayRef<double> coeffs,
                          const std::optional<at::Tensor>& table, const at::Tensor& x) {
  TORCH_CHECK(nin >= 1 && nin <= kMaxLinearInputs, "linear_step takes 1 to ", kMaxLinearInputs, " inputs, got ", nin);
  TORCH_CHECK(nout >= 1 && nout <= kMaxLinearOutputs, "linear_step has 1 to ", kMaxLinearOutputs, " outputs, got ",
              nout);
  LinearOp op;
  op.nin = int(nin);
  op.nout = int(nout);
  const int64_t w = nout * (nin + 1);
  if (table.has_value()) {
    const at::Tensor& t = *table;
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kDouble && t.size(1) == w,
                "linear_step's coefficient table must be a contiguous float64 (rows, ", w, ") tensor");
    TORCH_CHECK(t.size(0) == 1 || t.size(0) == batch_of(x), "the coefficient table has ", t.size(0),
                " rows but x has batch size ", batch_of(x));
    TORCH_CHECK(t.device() == x.device(), "the coefficient table must be on x's device");
    op.table = t.data_ptr<double>();
    op.rows = t.size(0);
  } else {
    TORCH_CHECK(int64_t(coeffs.size()) == w, "linear_step expects ", w, " coefficients, got ", coeffs.size());
    for (int64_t i = 0; i < w; ++i) op.shared[i] = coeffs[i];
  }
  return op;
}

// linear_step's inputs (x first) and noise, checked and cast as validate::operands does.
inline validate::Operands linear_operands(at::TensorList inputs, const std::optional<at::Tensor>& noise, bool noisy,
                                          const std::optional<at::Generator>& generator) {
  static const char* const kNames[kMaxLinearInputs] = {"inputs[0]", "inputs[1]", "inputs[2]",
                                                       "inputs[3]", "inputs[4]", "inputs[5]"};
  TORCH_CHECK_VALUE(!inputs.empty() && inputs.size() <= size_t(kMaxLinearInputs), "linear_step takes 1 to ",
                    kMaxLinearInputs, " inputs, got ", inputs.size());
  validate::NamedInput named[kMaxLinearInputs];
  for (size_t j = 0; j < inputs.size(); ++j) named[j] = {&inputs[j], kNames[j]};
  return validate::operands(c10::ArrayRef<validate::NamedInput>(named, inputs.size()), noise, noisy, generator);
}

}  // namespace diffkern
