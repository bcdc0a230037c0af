// Autograd kernels of the sampler-family ops, in C++ (a Python register_autograd would put
// ~10 us of Python on every step). Each step is linear in its tensor inputs with
// coefficients that depend on the levels only, so the backward is `grad * coefficient` per input: the
// coefficients are the <op>_jacobian ops (the functors' jacobian(), csrc/kernels/
// csrc/kernels/<op>.h, evaluated on the host once per level index) and the products are torch ops,
// so torch.compile / AOT autograd trace the backward like any other. lcm_step with
// clip_sample is not linear in (x, m); its backward is the fused lcm_step_backward op.
//
// Levels that live on a device are copied to the host for the coefficients: one small
// synchronous copy per backward call (never in the forward).
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>

#include "sampler_args.h"

namespace diffkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::OperatorHandle op_handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

at::Tensor defined_or_empty(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// (*L, 2 * kJacobianWidth) float64, L the common shape of the levels (levels.h; all ones
// when no level varies): entry l holds d out / d (in0..in3, z) at level index l, then the
// same for the second output (zeros for single-output ops).
template <class Op>
at::Tensor jacobian_table(const Op& op, const LevelSet& lv) {
  at::DimVector shape = lv.shape();
  if (!op.per_sample()) std::fill(shape.begin(), shape.end(), 1);
  shape.push_back(2 * kJacobianWidth);
  at::Tensor j = at::zeros(shape, at::kDouble);
  const int64_t nl = j.numel() / (2 * kJacobianWidth);
  double* p = j.data_ptr<double>();
  for (int64_t l = 0; l < nl; ++l) op.template jacobian<double>(l, p + l * 2 * kJacobianWidth);
  return j;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Column c of the table: a factor of the levels' shape, broadcasting against g (x's
// dims), in g's compute dtype.
at::Tensor factor(const at::Tensor& table, int64_t c, const at::Tensor& g) {
  return table.select(-1, c).to(compute_type(g.scalar_type()));
}

// dL/d input for the input of column c: g0 * J0[c] (+ g1 * J1[c]), summed to the input's
// shape, in its dtype. Undefined when no output gradient is.
at::Tensor linear_grad(const at::Tensor& table, int64_t c, const at::Tensor& g0, const at::Tensor& g1,
                       at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor r;
  if (g0.defined()) r = g0.to(compute_type(g0.scalar_type())) * factor(table, c, g0);
  if (g1.defined() && g1.numel() > 0) {
    at::Tensor t = g1.to(compute_type(g1.scalar_type())) * factor(table, kJacobianWidth + c, g1);
    r = r.defined() ? r + t : t;
  }
  if (!r.defined()) return r;
  if (r.sizes() != shape) r = at::sum_to(r, shape);
  return r.to(dtype);
}

void save_shapes(AutogradContext* ctx, std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  for (const auto& [name, t] : inputs) {
    if (!t || !t->defined()) continue;
    ctx->saved_data[std::string(name) + "_shape"] = t->sizes().vec();
    ctx->saved_data[std::string(name) + "_dtype"] = int64_t(t->scalar_type());
  }
}

at::Tensor grad_for(AutogradContext* ctx, const at::Tensor& table, int64_t c, const char* name, const at::Tensor& g0,
                    const at::Tensor& g1) {
  const std::string key(name);
  if (!ctx->saved_data.count(key + "_shape")) return {};
  return linear_grad(table, c, g0, g1, ctx->saved_data[key + "_shape"].toIntVector(),
                     at::ScalarType(ctx->saved_data[key + "_dtype"].toInt()));
}

// Whether autograd has anything to record: without it a call goes straight below
// autograd, with no graph node (a few us of host time per sampling step).
inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool wants_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }
template <class... T>
bool needs_grad(const T&... ts) {
  return at::GradMode::is_enabled() && (wants_grad(ts) || ...);
}

// An output gradient: it has x's shape and device (the jacobian ops' `x` argument).
const at::Tensor& any_grad(const variable_list& grads) {
  return grads[0].defined() || grads.size() < 2 ? grads[0] : grads[1];
}

// ---- the jacobian ops ----------------------------------------------------------------------
at::Tensor on_device_of(const at::Tensor& x, const at::Tensor& table) { return table.to(x.device()); }

at::Tensor euler_step_jacobian(const at::Tensor& x, const OptTensor& st, const OptTensor& snt, double s, double sn,
                               double eta, double s_noise, double gamma, int64_t prediction) {
  LevelSet lv(x, {{&st, "sigma"}, {&snt, "sigma_next"}}, /*on_host=*/true);
  const EulerOp op = euler_op(lv, st, snt, s, sn, eta, s_noise, gamma, prediction);
  return on_device_of(x, jacobian_table(op, lv));
}

at::Tensor heun_step_jacobian(const at::Tensor& x, const OptTensor& st, const OptTensor& snt, double s, double sn,
                              int64_t prediction) {
  LevelSet lv(x, {{&st, "sigma"}, {&snt, "sigma_next"}}, /*on_host=*/true);
  const HeunOp op = heun_op(lv, st, snt, s, sn, prediction);
  return on_device_of(x, jacobian_table(op, lv));
}

at::Tensor dpmpp_2m_step_jacobian(const at::Tensor& x, const OptTensor& st, const OptTensor& snt,
                                  const OptTensor& spt, double s, double sn, double sp, int64_t prediction,
                                  int64_t solver, bool vp, bool has_old) {
  const OptTensor prev_t = has_old ? spt : std::nullopt;
  LevelSet lv(x, {{&st, "sigma"}, {&snt, "sigma_next"}, {&prev_t, "sigma_prev"}}, /*on_host=*/true);
  const DpmppOp op = dpmpp_2m_op(lv, st, snt, prev_t, s, sn, sp, prediction, solver, vp, has_old);
  return on_device_of(x, jacobian_table(op, lv));
}

at::Tensor flow_step_jacobian(const at::Tensor& x, const OptTensor& st, const OptTensor& snt, double s, double sn,
                              bool stochastic) {
  LevelSet lv(x, {{&st, "sigma"}, {&snt, "sigma_next"}}, /*on_host=*/true);
  const FlowOp op = flow_op(lv, st, snt, s, sn, stochastic);
  return on_device_of(x, jacobian_table(op, lv));
}

at::Tensor flow_q_sample_jacobian(const at::Tensor& x0, const OptTensor& st, double s) {
  LevelSet lv(x0, {{&st, "sigma"}}, /*on_host=*/true);
  const FlowQSampleOp op = flow_q_sample_op(lv, st, s);
  return on_device_of(x0, jacobian_table(op, lv));
}

at::Tensor lcm_step_jacobian(const at::Tensor& x, const at::Tensor& t, const at::Tensor& tp, const at::Tensor& table,
                             double ts, double sd, int64_t prediction, bool renoise) {
  LevelSet lv(x, {{&t, "t"}, {&tp, "t_prev"}}, /*on_host=*/true);
  const at::Tensor host_table = table.to(at::kCPU);
  const LcmOp op = lcm_op(lv, host_table, t, tp, ts, sd, prediction, 0.0, renoise);
  return on_device_of(x, jacobian_table(op, lv));
}

using EulerJacSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, double, double, double, double,
                               double, int64_t);
using HeunJacSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, double, double, int64_t);
using DpmppJacSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double,
                               double, int64_t, int64_t, bool, bool);
using FlowJacSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, double, double, bool);
using FlowQJacSig = at::Tensor(const at::Tensor&, const OptTensor&, double);
using LcmJacSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                             int64_t, bool);

// ---- euler_step ------------------------------------------------------------------------
using EulerSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double, double,
                            double, double, double, int64_t, const OptTensor&, const std::optional<at::Generator>&,
                            int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);

struct EulerFn : public torch::autograd::Function<EulerFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const OptTensor& st,
                            const OptTensor& snt, double s, double sn, double eta, double s_noise, double gamma,
                            int64_t prediction, const OptTensor& noise, const std::optional<at::Generator>& generator,
                            int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::euler_step").typed<EulerSig>();
    ctx->save_for_backward({defined_or_empty(st), defined_or_empty(snt)});
    ctx->saved_data["s"] = s;
    ctx->saved_data["sn"] = sn;
    ctx->saved_data["eta"] = eta;
    ctx->saved_data["s_noise"] = s_noise;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["prediction"] = prediction;
    const bool noisy = eta > 0 || gamma > 0;
    const at::Tensor used_noise = noisy ? defined_or_empty(noise) : at::Tensor();
    save_shapes(ctx, {{"x", &x}, {"m", &m}, {"noise", &used_noise}});
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, st, snt, s, sn, eta, s_noise, gamma, prediction, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto jac = op_handle("diffkern::euler_step_jacobian").typed<EulerJacSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor j = jac.call(any_grad(grads), optional_of(saved[0]), optional_of(saved[1]),
                                  ctx->saved_data["s"].toDouble(), ctx->saved_data["sn"].toDouble(),
                                  ctx->saved_data["eta"].toDouble(), ctx->saved_data["s_noise"].toDouble(),
                                  ctx->saved_data["gamma"].toDouble(), ctx->saved_data["prediction"].toInt());
    variable_list out(17);
    out[0] = grad_for(ctx, j, 0, "x", grads[0], {});
    out[1] = grad_for(ctx, j, 1, "m", grads[0], {});
    out[10] = grad_for(ctx, j, 4, "noise", grads[0], {});
    return out;
  }
};

at::Tensor euler_step_autograd(const at::Tensor& x, const at::Tensor& m, const OptTensor& st, const OptTensor& snt,
                               double s, double sn, double eta, double s_noise, double gamma, int64_t prediction,
                               const OptTensor& noise, const std::optional<at::Generator>& generator, int64_t seed,
                               int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x, m, st, snt, noise)) {
    static auto op = op_handle("diffkern::euler_step").typed<EulerSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, st, snt, s, sn, eta, s_noise, gamma, prediction, noise, generator, seed, offset, seeds, step_t, step);
  }
  return EulerFn::apply(x, m, st, snt, s, sn, eta, s_noise, gamma, prediction, noise, generator, seed, offset, seeds, step_t, step);
}

// ---- heun_step -------------------------------------------------------------------------
using HeunSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, const OptTensor&, double, double, int64_t);

struct HeunFn : public torch::autograd::Function<HeunFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const at::Tensor& xp,
                            const at::Tensor& mp, const OptTensor& st, const OptTensor& snt, double s, double sn,
                            int64_t prediction) {
    static auto op = op_handle("diffkern::heun_step").typed<HeunSig>();
    ctx->save_for_backward({defined_or_empty(st), defined_or_empty(snt)});
    ctx->saved_data["s"] = s;
    ctx->saved_data["sn"] = sn;
    ctx->saved_data["prediction"] = prediction;
    save_shapes(ctx, {{"x", &x}, {"m", &m}, {"xp", &xp}, {"mp", &mp}});
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, xp, mp, st, snt, s, sn, prediction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto jac = op_handle("diffkern::heun_step_jacobian").typed<HeunJacSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor j = jac.call(any_grad(grads), optional_of(saved[0]), optional_of(saved[1]),
                                  ctx->saved_data["s"].toDouble(), ctx->saved_data["sn"].toDouble(),
                                  ctx->saved_data["prediction"].toInt());
    variable_list out(9);
    out[0] = grad_for(ctx, j, 0, "x", grads[0], {});
    out[1] = grad_for(ctx, j, 1, "m", grads[0], {});
    out[2] = grad_for(ctx, j, 2, "xp", grads[0], {});
    out[3] = grad_for(ctx, j, 3, "mp", grads[0], {});
    return out;
  }
};

at::Tensor heun_step_autograd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& xp, const at::Tensor& mp,
                              const OptTensor& st, const OptTensor& snt, double s, double sn, int64_t prediction) {
  if (!needs_grad(x, m, xp, mp, st, snt)) {
    static auto op = op_handle("diffkern::heun_step").typed<HeunSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, xp, mp, st, snt, s, sn, prediction);
  }
  return HeunFn::apply(x, m, xp, mp, st, snt, s, sn, prediction);
}

// ---- dpmpp_2m_step ---------------------------------------------------------------------
using DpmppSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                    const OptTensor&, const OptTensor&, const OptTensor&, double,
                                                    double, double, int64_t, int64_t, bool, bool);

struct DpmppFn : public torch::autograd::Function<DpmppFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const OptTensor& old,
                               const OptTensor& st, const OptTensor& snt, const OptTensor& spt, double s, double sn,
                               double sp, int64_t prediction, int64_t solver, bool vp, bool return_denoised) {
    static auto op = op_handle("diffkern::dpmpp_2m_step").typed<DpmppSig>();
    ctx->save_for_backward({defined_or_empty(st), defined_or_empty(snt), defined_or_empty(spt)});
    ctx->saved_data["s"] = s;
    ctx->saved_data["sn"] = sn;
    ctx->saved_data["sp"] = sp;
    ctx->saved_data["prediction"] = prediction;
    ctx->saved_data["solver"] = solver;
    ctx->saved_data["vp"] = vp;
    const at::Tensor old_t = defined_or_empty(old);
    save_shapes(ctx, {{"x", &x}, {"m", &m}, {"old", &old_t}});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, den] = op.call(x, m, old, st, snt, spt, s, sn, sp, prediction, solver, vp, return_denoised);
    if (!return_denoised) ctx->mark_non_differentiable({den});
    return {out, den};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto jac = op_handle("diffkern::dpmpp_2m_step_jacobian").typed<DpmppJacSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor j = jac.call(any_grad(grads), optional_of(saved[0]), optional_of(saved[1]),
                                  optional_of(saved[2]), ctx->saved_data["s"].toDouble(),
                                  ctx->saved_data["sn"].toDouble(), ctx->saved_data["sp"].toDouble(),
                                  ctx->saved_data["prediction"].toInt(), ctx->saved_data["solver"].toInt(),
                                  ctx->saved_data["vp"].toBool(), ctx->saved_data.count("old_shape") > 0);
    variable_list out(13);
    out[0] = grad_for(ctx, j, 0, "x", grads[0], grads[1]);
    out[1] = grad_for(ctx, j, 1, "m", grads[0], grads[1]);
    out[2] = grad_for(ctx, j, 2, "old", grads[0], grads[1]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> dpmpp_2m_step_autograd(const at::Tensor& x, const at::Tensor& m,
                                                          const OptTensor& old, const OptTensor& st,
                                                          const OptTensor& snt, const OptTensor& spt, double s,
                                                          double sn, double sp, int64_t prediction, int64_t solver,
                                                          bool vp, bool return_denoised) {
  if (!needs_grad(x, m, old, st, snt, spt)) {
    static auto op = op_handle("diffkern::dpmpp_2m_step").typed<DpmppSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, old, st, snt, spt, s, sn, sp, prediction, solver, vp, return_denoised);
  }
  auto r = DpmppFn::apply(x, m, old, st, snt, spt, s, sn, sp, prediction, solver, vp, return_denoised);
  return {r[0], r[1]};
}

// ---- flow_step / flow_q_sample -----------------------------------------------------------
using FlowSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double, double,
                           bool, const OptTensor&, const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);

struct FlowFn : public torch::autograd::Function<FlowFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& v, const OptTensor& st,
                            const OptTensor& snt, double s, double sn, bool stochastic, const OptTensor& noise,
                            const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::flow_step").typed<FlowSig>();
    ctx->save_for_backward({defined_or_empty(st), defined_or_empty(snt)});
    ctx->saved_data["s"] = s;
    ctx->saved_data["sn"] = sn;
    ctx->saved_data["stochastic"] = stochastic;
    const at::Tensor used_noise = stochastic ? defined_or_empty(noise) : at::Tensor();
    save_shapes(ctx, {{"x", &x}, {"m", &v}, {"noise", &used_noise}});
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, v, st, snt, s, sn, stochastic, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto jac = op_handle("diffkern::flow_step_jacobian").typed<FlowJacSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor j = jac.call(any_grad(grads), optional_of(saved[0]), optional_of(saved[1]),
                                  ctx->saved_data["s"].toDouble(), ctx->saved_data["sn"].toDouble(),
                                  ctx->saved_data["stochastic"].toBool());
    variable_list out(14);
    out[0] = grad_for(ctx, j, 0, "x", grads[0], {});
    out[1] = grad_for(ctx, j, 1, "m", grads[0], {});
    out[7] = grad_for(ctx, j, 4, "noise", grads[0], {});
    return out;
  }
};

at::Tensor flow_step_autograd(const at::Tensor& x, const at::Tensor& v, const OptTensor& st, const OptTensor& snt,
                              double s, double sn, bool stochastic, const OptTensor& noise,
                              const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x, v, st, snt, noise)) {
    static auto op = op_handle("diffkern::flow_step").typed<FlowSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, v, st, snt, s, sn, stochastic, noise, generator, seed, offset, seeds, step_t, step);
  }
  return FlowFn::apply(x, v, st, snt, s, sn, stochastic, noise, generator, seed, offset, seeds, step_t, step);
}

using FlowQSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, double, const OptTensor&,
                                                    const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);

struct FlowQFn : public torch::autograd::Function<FlowQFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const OptTensor& st, double s,
                               const OptTensor& noise, const std::optional<at::Generator>& generator, int64_t seed,
                               int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::flow_q_sample").typed<FlowQSig>();
    ctx->save_for_backward({defined_or_empty(st)});
    ctx->saved_data["s"] = s;
    const at::Tensor n = defined_or_empty(noise);
    save_shapes(ctx, {{"x", &x0}, {"noise", &n}});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [xt, drawn] = op.call(x0, st, s, noise, generator, seed, offset, seeds, step_t, step);
    ctx->mark_non_differentiable({drawn});  // drawn noise depends on no input
    return {xt, drawn};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto jac = op_handle("diffkern::flow_q_sample_jacobian").typed<FlowQJacSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor j = jac.call(any_grad(grads), optional_of(saved[0]), ctx->saved_data["s"].toDouble());
    variable_list out(10);
    out[0] = grad_for(ctx, j, 0, "x", grads[0], {});
    out[3] = grad_for(ctx, j, 4, "noise", grads[0], {});
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> flow_q_sample_autograd(const at::Tensor& x0, const OptTensor& st, double s,
                                                          const OptTensor& noise,
                                                          const std::optional<at::Generator>& generator, int64_t seed,
                                                          int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x0, st, noise)) {
    static auto op = op_handle("diffkern::flow_q_sample").typed<FlowQSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x0, st, s, noise, generator, seed, offset, seeds, step_t, step);
  }
  auto r = FlowQFn::apply(x0, st, s, noise, generator, seed, offset, seeds, step_t, step);
  return {r[0], r[1]};
}

// ---- lcm_step ----------------------------------------------------------------------------
using LcmSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, double, double, int64_t,
                                                  double, bool, const OptTensor&, const std::optional<at::Generator>&,
                                                  int64_t, int64_t, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using LcmBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, double, double, int64_t, double);

struct LcmFn : public torch::autograd::Function<LcmFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                               const at::Tensor& tp, const at::Tensor& table, double ts, double sd, int64_t prediction,
                               double clip, bool renoise, const OptTensor& noise,
                               const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                               bool return_denoised, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::lcm_step").typed<LcmSig>();
    ctx->save_for_backward({x, m, t, tp, table});
    ctx->saved_data["ts"] = ts;
    ctx->saved_data["sd"] = sd;
    ctx->saved_data["prediction"] = prediction;
    ctx->saved_data["clip"] = clip;
    ctx->saved_data["renoise"] = renoise;
    const at::Tensor used_noise = renoise ? defined_or_empty(noise) : at::Tensor();
    save_shapes(ctx, {{"x", &x}, {"m", &m}, {"noise", &used_noise}});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, den] =
        op.call(x, m, t, tp, table, ts, sd, prediction, clip, renoise, noise, generator, seed, offset, return_denoised, seeds, step_t, step);
    if (!return_denoised) ctx->mark_non_differentiable({den});
    return {out, den};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &m = saved[1], &t = saved[2], &tp = saved[3], &table = saved[4];
    const double ts = ctx->saved_data["ts"].toDouble(), sd = ctx->saved_data["sd"].toDouble();
    const double clip = ctx->saved_data["clip"].toDouble();
    const int64_t prediction = ctx->saved_data["prediction"].toInt();
    static auto jac = op_handle("diffkern::lcm_step_jacobian").typed<LcmJacSig>();
    const at::Tensor j = jac.call(x, t, tp, table, ts, sd, prediction, ctx->saved_data["renoise"].toBool());
    const at::Tensor g_den = grads[1].defined() && grads[1].numel() > 0 ? grads[1] : at::Tensor();
    variable_list out(18);
    if (clip > 0) {
      static auto backward_op = op_handle("diffkern::lcm_step_backward").typed<LcmBackwardSig>();
      const at::Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(g_den.defined() ? g_den : x);
      auto [gx, gm] = backward_op.call(g, optional_of(g_den), x, m, t, tp, table, ts, sd, prediction, clip);
      out[0] = gx.sizes() == x.sizes() ? gx : at::sum_to(gx, x.sizes());
      out[1] = gm.sizes() == m.sizes() ? gm : at::sum_to(gm, m.sizes());
    } else {
      out[0] = grad_for(ctx, j, 0, "x", grads[0], g_den);
      out[1] = grad_for(ctx, j, 1, "m", grads[0], g_den);
    }
    out[10] = grad_for(ctx, j, 4, "noise", grads[0], {});
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> lcm_step_autograd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                                                     const at::Tensor& tp, const at::Tensor& table, double ts,
                                                     double sd, int64_t prediction, double clip, bool renoise,
                                                     const OptTensor& noise,
                                                     const std::optional<at::Generator>& generator, int64_t seed,
                                                     int64_t offset, bool return_denoised, const OptTensor& seeds,
                                                     const OptTensor& step_t, int64_t step) {
  if (!needs_grad(x, m, noise)) {
    static auto op = op_handle("diffkern::lcm_step").typed<LcmSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, t, tp, table, ts, sd, prediction, clip, renoise, noise, generator, seed, offset,
                        return_denoised, seeds, step_t, step);
  }
  auto r = LcmFn::apply(x, m, t, tp, table, ts, sd, prediction, clip, renoise, noise, generator, seed, offset,
                        return_denoised, seeds, step_t, step);
  return {r[0], r[1]};
}

// ---- linear_step -------------------------------------------------------------------------
// out_o = sum_j c[o][j] in_j + c[o][J] z: the coefficients are the op's own arguments, so
// the backward needs no jacobian op: d in_j = sum_o c[o][j] d out_o, per sample.
using LinearSig = std::vector<at::Tensor>(at::TensorList, c10::ArrayRef<double>, const OptTensor&, int64_t, bool,
                                          const OptTensor&, const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);

// Column c of a (1|B, n) coefficient table as a factor of g (B, ...) in g's dtype, without
// reading sizes (they may be symbolic under torch.compile).
at::Tensor sample_factor(const at::Tensor& table, int64_t c, const at::Tensor& g) {
  std::vector<int64_t> shape(size_t(std::max<int64_t>(g.dim(), 1)), 1);
  shape[0] = -1;
  return table.select(1, c).reshape(shape).to(g.scalar_type());
}

struct LinearFn : public torch::autograd::Function<LinearFn> {
  // The inputs as separate arguments (autograd tracks each), at most kMaxLinearInputs.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const OptTensor& x1, const OptTensor& x2,
                               const OptTensor& x3, const OptTensor& x4, const OptTensor& x5, const OptTensor& noise,
                               c10::ArrayRef<double> coeffs, const OptTensor& table, int64_t outputs, bool noisy,
                               const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::linear_step").typed<LinearSig>();
    std::vector<at::Tensor> ins{x0};
    for (const OptTensor* t : {&x1, &x2, &x3, &x4, &x5})
      if (t->has_value()) ins.push_back(**t);
    // shared coefficients stay numbers (a tensor made from host data cannot be traced)
    if (table.has_value())
      ctx->saved_data["table"] = *table;
    else
      ctx->saved_data["coeffs"] = coeffs.vec();
    ctx->saved_data["nin"] = int64_t(ins.size());
    ctx->saved_data["outputs"] = outputs;
    static const char* const kNames[kMaxLinearInputs] = {"in0", "in1", "in2", "in3", "in4", "in5"};
    for (size_t j = 0; j < ins.size(); ++j) save_shapes(ctx, {{kNames[j], &ins[j]}});
    const at::Tensor used_noise = noisy ? defined_or_empty(noise) : at::Tensor();
    save_shapes(ctx, {{"noise", &used_noise}});
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(ins, coeffs, table, outputs, noisy, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t nin = ctx->saved_data["nin"].toInt(), nout = ctx->saved_data["outputs"].toInt();
    const bool per_sample = ctx->saved_data.count("table") > 0;
    at::Tensor table;
    std::vector<double> shared;
    if (per_sample) {
      for (const auto& g : grads)
        if (g.defined()) table = ctx->saved_data["table"].toTensor().to(g.device());
    } else {
      shared = ctx->saved_data["coeffs"].toDoubleVector();
    }
    variable_list out(17);
    static const char* const kNames[kMaxLinearInputs + 1] = {"in0", "in1", "in2", "in3", "in4", "in5", "noise"};
    for (int64_t j = 0; j <= nin; ++j) {
      const char* name = j < nin ? kNames[j] : kNames[kMaxLinearInputs];
      const std::string key(name);
      if (!ctx->saved_data.count(key + "_shape")) continue;
      at::Tensor r;
      for (int64_t o = 0; o < nout; ++o) {
        if (!grads[o].defined()) continue;
        const int64_t c = o * (nin + 1) + j;
        const at::Tensor g = grads[o].to(compute_type(grads[o].scalar_type()));
        at::Tensor t = per_sample ? g * sample_factor(table, c, g) : g * shared[size_t(c)];
        r = r.defined() ? r + t : t;
      }
      if (!r.defined()) continue;
      const std::vector<int64_t> shape = ctx->saved_data[key + "_shape"].toIntVector();
      r = at::sum_to(r, c10::fromIntArrayRefSlow(shape));  // symbolic-size safe (torch.compile)
      out[j < nin ? j : kMaxLinearInputs] = r.to(at::ScalarType(ctx->saved_data[key + "_dtype"].toInt()));
    }
    return out;
  }
};

std::vector<at::Tensor> linear_step_autograd(at::TensorList inputs, c10::ArrayRef<double> coeffs,
                                             const OptTensor& table, int64_t outputs, bool noisy,
                                             const OptTensor& noise, const std::optional<at::Generator>& generator,
                                             int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  TORCH_CHECK(!inputs.empty() && int64_t(inputs.size()) <= kMaxLinearInputs, "linear_step takes 1 to ",
              kMaxLinearInputs, " inputs, got ", inputs.size());
  bool grad = needs_grad(noise, table);
  for (const at::Tensor& t : inputs) grad = grad || needs_grad(t);
  if (!grad) {
    static auto op = op_handle("diffkern::linear_step").typed<LinearSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(inputs, coeffs, table, outputs, noisy, noise, generator, seed, offset, seeds, step_t, step);
  }
  auto in = [&](size_t j) { return j < inputs.size() ? OptTensor(inputs[j]) : std::nullopt; };
  return LinearFn::apply(inputs[0], in(1), in(2), in(3), in(4), in(5), noise, coeffs, table, outputs, noisy,
                         generator, seed, offset, seeds, step_t, step);
}

}  // namespace

// Host code over whatever device the levels live on: one kernel for every backend.
TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("euler_step_jacobian", &euler_step_jacobian);
  m.impl("heun_step_jacobian", &heun_step_jacobian);
  m.impl("dpmpp_2m_step_jacobian", &dpmpp_2m_step_jacobian);
  m.impl("flow_step_jacobian", &flow_step_jacobian);
  m.impl("flow_q_sample_jacobian", &flow_q_sample_jacobian);
  m.impl("lcm_step_jacobian", &lcm_step_jacobian);
}

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("euler_step", &euler_step_autograd);
  m.impl("heun_step", &heun_step_autograd);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step_autograd);
  m.impl("flow_step", &flow_step_autograd);
  m.impl("flow_q_sample", &flow_q_sample_autograd);
  m.impl("lcm_step", &lcm_step_autograd);
  m.impl("linear_step", &linear_step_autograd);
}

}  // namespace diffkern
