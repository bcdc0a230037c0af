// Autograd kernels of the elementwise ops (q_sample, ddim_step, ddpm_step, langevin_step)
// and of step_backward, in C++. torch.library.register_autograd would put a Python
// function on every call's path (~10 us per step on a small tensor, more than the step
// itself); here the forward redispatches below autograd, directly when no input needs a
// gradient (no graph node, nothing saved), and the backward is the fused step_backward op
// (its coefficients come from the same csrc/kernels functors as the forward's).
//
// Double backward: every backward is linear in the incoming gradient with coefficients
// that do not depend on x or the model output (clip_sample's mask is piecewise constant),
// so the second derivative w.r.t. x and m is zero and the one w.r.t. the incoming
// gradient is the same coefficients again (StepBackwardFn).
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>

#include "common.h"

namespace diffkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A gradient of the output's shape summed down to a broadcast input's shape.
at::Tensor reduce_to(const at::Tensor& g, at::IntArrayRef shape) {
  return g.sizes() == shape ? g : at::sum_to(g, shape);
}

std::vector<int64_t> shape_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->sizes().vec() : std::vector<int64_t>{};
}

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

using StepSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, double, int64_t, double, const std::optional<at::Tensor>&,
                           const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using DdpmSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, int64_t, int64_t, double, const std::optional<at::Tensor>&,
                           const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using LangevinSig = at::Tensor(const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&,
                               const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, int64_t, double, int64_t, int64_t, double, bool);

bool needs_grad(const at::Tensor& a, const at::Tensor* b, const std::optional<at::Tensor>& c) {
  if (!at::GradMode::is_enabled()) return false;
  return a.requires_grad() || (b && b->requires_grad()) || (c.has_value() && c->requires_grad());
}

// Saves what the fused backward needs; `kind` 0 = DDIM (a = eta), 1 = DDPM (a = variance).
void save_step(AutogradContext* ctx, int64_t kind, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
               const std::optional<at::Tensor>& t_prev, const at::Tensor& table, double eta, int64_t variance,
               int64_t prediction, double clip, const std::optional<at::Tensor>& noise) {
  ctx->save_for_backward({x, m, t, t_prev.value_or(at::Tensor()), table});
  ctx->saved_data["kind"] = kind;
  ctx->saved_data["eta"] = eta;
  ctx->saved_data["variance"] = variance;
  ctx->saved_data["prediction"] = prediction;
  ctx->saved_data["clip"] = clip;
  // eta = 0 ignores the noise; otherwise it enters as std * z.
  const bool noise_used = noise.has_value() && (kind == 1 || eta > 0);
  ctx->saved_data["noise_grad"] = noise_used && noise->requires_grad();
  ctx->saved_data["noise_shape"] = shape_of(noise);
}

// Gradients for (x, m, t, t_prev, table, a, prediction, clip, noise, generator, seed, offset, seeds, step_t, step).
variable_list step_grads(AutogradContext* ctx, const variable_list& grads) {
  static auto backward = op_handle("diffkern::step_backward").typed<BackwardSig>();
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &m = saved[1], &t = saved[2], &table = saved[4];
  const std::optional<at::Tensor> t_prev = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
  const bool noise_grad = ctx->saved_data["noise_grad"].toBool();
  auto [gx, gm, gz] = backward.call(grads[0].contiguous(), x, m, t, t_prev, table, ctx->saved_data["kind"].toInt(),
                                    ctx->saved_data["eta"].toDouble(), ctx->saved_data["variance"].toInt(),
                                    ctx->saved_data["prediction"].toInt(), ctx->saved_data["clip"].toDouble(),
                                    noise_grad);
  variable_list out(15);
  out[0] = reduce_to(gx, x.sizes());
  out[1] = reduce_to(gm, m.sizes());
  if (noise_grad) out[8] = reduce_to(gz, ctx->saved_data["noise_shape"].toIntVector());
  return out;
}

struct DdimFn : public torch::autograd::Function<DdimFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                            const std::optional<at::Tensor>& t_prev, const at::Tensor& table, double eta,
                            int64_t prediction, double clip, const std::optional<at::Tensor>& noise,
                            const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::ddim_step").typed<StepSig>();
    save_step(ctx, 0, x, m, t, t_prev, table, eta, 0, prediction, clip, noise);
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, t, t_prev, table, eta, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return step_grads(ctx, grads); }
};

struct DdpmFn : public torch::autograd::Function<DdpmFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                            const std::optional<at::Tensor>& t_prev, const at::Tensor& table, int64_t variance,
                            int64_t prediction, double clip, const std::optional<at::Tensor>& noise,
                            const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::ddpm_step").typed<DdpmSig>();
    save_step(ctx, 1, x, m, t, t_prev, table, 0.0, variance, prediction, clip, noise);
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, t, t_prev, table, variance, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return step_grads(ctx, grads); }
};

// x + a s + sqrt(2 a) z: the gradients are the coefficients of LangevinOp (csrc/kernels/langevin.h).
struct LangevinFn : public torch::autograd::Function<LangevinFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& score, double step_size,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                            int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::langevin_step").typed<LangevinSig>();
    ctx->saved_data["step_size"] = step_size;
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["score_shape"] = score.sizes().vec();
    ctx->saved_data["noise_shape"] = shape_of(noise);
    ctx->saved_data["has_noise"] = noise.has_value();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, score, step_size, noise, generator, seed, offset, seeds, step_t, step);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const StepCoeffs<double> k = LangevinOp{ctx->saved_data["step_size"].toDouble()}.coeffs<double>(0);
    const at::Tensor& g = grads[0];
    variable_list out(10);
    out[0] = reduce_to(g, ctx->saved_data["x_shape"].toIntVector());
    out[1] = reduce_to(g * k.c1, ctx->saved_data["score_shape"].toIntVector());
    if (ctx->saved_data["has_noise"].toBool()) out[3] = reduce_to(g * k.std, ctx->saved_data["noise_shape"].toIntVector());
    return out;
  }
};

at::Tensor ddim_step_autograd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                              const std::optional<at::Tensor>& t_prev, const at::Tensor& table, double eta,
                              int64_t prediction, double clip, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x, &m, noise)) {
    static auto op = op_handle("diffkern::ddim_step").typed<StepSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, t, t_prev, table, eta, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
  }
  return DdimFn::apply(x, m, t, t_prev, table, eta, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
}

at::Tensor ddpm_step_autograd(const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
                              const std::optional<at::Tensor>& t_prev, const at::Tensor& table, int64_t variance,
                              int64_t prediction, double clip, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x, &m, noise)) {
    static auto op = op_handle("diffkern::ddpm_step").typed<DdpmSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, m, t, t_prev, table, variance, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
  }
  return DdpmFn::apply(x, m, t, t_prev, table, variance, prediction, clip, noise, generator, seed, offset, seeds, step_t, step);
}

at::Tensor langevin_step_autograd(const at::Tensor& x, const at::Tensor& score, double step_size,
                                  const std::optional<at::Tensor>& noise,
                                  const std::optional<at::Generator>& generator, int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x, &score, noise)) {
    static auto op = op_handle("diffkern::langevin_step").typed<LangevinSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, score, step_size, noise, generator, seed, offset, seeds, step_t, step);
  }
  return LangevinFn::apply(x, score, step_size, noise, generator, seed, offset, seeds, step_t, step);
}


// d(gx, gm, gz)/d grad: the same per-element coefficients, read off the fused backward
// at grad = 1; zero w.r.t. x and m.
struct StepBackwardFn : public torch::autograd::Function<StepBackwardFn> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
      const std::optional<at::Tensor>& t_prev, const at::Tensor& table, int64_t kind, double eta, int64_t variance,
      int64_t prediction, double clip, bool noise_grad) {
    static auto op = op_handle("diffkern::step_backward").typed<BackwardSig>();
    ctx->save_for_backward({x, m, t, t_prev.value_or(at::Tensor()), table});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["eta"] = eta;
    ctx->saved_data["variance"] = variance;
    ctx->saved_data["prediction"] = prediction;
    ctx->saved_data["clip"] = clip;
    ctx->saved_data["grad_dtype"] = grad.scalar_type();
    ctx->saved_data["noise_grad"] = noise_grad;
    at::AutoDispatchBelowADInplaceOrView below;
    auto [gx, gm, gz] = op.call(grad, x, m, t, t_prev, table, kind, eta, variance, prediction, clip, noise_grad);
    return {gx, gm, gz};
  }
  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    static auto op = op_handle("diffkern::step_backward").typed<BackwardSig>();
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> t_prev =
        saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    at::Tensor cx, cm, cz;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(cx, cm, cz) = op.call(at::ones_like(saved[0], at::MemoryFormat::Contiguous), saved[0], saved[1],
                                     saved[2], t_prev, saved[4], ctx->saved_data["kind"].toInt(),
                                     ctx->saved_data["eta"].toDouble(), ctx->saved_data["variance"].toInt(),
                                     ctx->saved_data["prediction"].toInt(), ctx->saved_data["clip"].toDouble(), true);
    }
    at::Tensor ggrad;
    const auto add = [&](const at::Tensor& g, const at::Tensor& c) {
      if (!g.defined()) return;
      ggrad = ggrad.defined() ? ggrad + g * c : g * c;
    };
    add(gg[0], cx);
    add(gg[1], cm);
    if (ctx->saved_data["noise_grad"].toBool()) add(gg[2], cz);  // else gz was an empty placeholder
    variable_list out(12);
    if (ggrad.defined()) out[0] = ggrad.to(ctx->saved_data["grad_dtype"].toScalarType());
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_backward_autograd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& m, const at::Tensor& t,
    const std::optional<at::Tensor>& t_prev, const at::Tensor& table, int64_t kind, double eta, int64_t variance,
    int64_t prediction, double clip, bool noise_grad) {
  if (!at::GradMode::is_enabled() || !grad.requires_grad()) {
    static auto op = op_handle("diffkern::step_backward").typed<BackwardSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(grad, x, m, t, t_prev, table, kind, eta, variance, prediction, clip, noise_grad);
  }
  auto r = StepBackwardFn::apply(grad, x, m, t, t_prev, table, kind, eta, variance, prediction, clip, noise_grad);
  return {r[0], r[1], r[2]};
}

using QSampleSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Generator>&, int64_t, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t);

// x_t = sqrt(ab) x0 + sqrt(1 - ab) noise: per-sample coefficients gathered from the
// table (a small eager expression: it runs once per training step, next to a model).
struct QSampleFn : public torch::autograd::Function<QSampleFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& table,
                               const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator,
                               int64_t seed, int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
    static auto op = op_handle("diffkern::q_sample").typed<QSampleSig>();
    // noise is saved for its (possibly symbolic) shape; shapes as int lists would not
    // survive torch.compile's dynamic shapes
    ctx->save_for_backward({t, table, noise.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [xt, z] = op.call(x0, t, table, noise, generator, seed, offset, seeds, step_t, step);
    ctx->mark_non_differentiable({z});
    return {xt, z};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];
    variable_list out(10);
    if (!g.defined()) return out;
    const at::Tensor& table = saved[1];
    const c10::SymInt T = table.sym_numel();  // symbolic under torch.compile's dynamic shapes
    // t was validated by the forward; NaN where it is out of range, as the kernels do.
    // ab in t's layout aligned to x0's dims (levels.h: per sample, per frame, ...), from
    // symbolic sizes (torch.compile's dynamic shapes)
    const at::Tensor& t_in = saved[0];
    c10::SymDimVector shape(size_t(g.dim()), c10::SymInt(1));
    if (t_in.dim() == 1 && g.dim() > 0) shape[0] = c10::SymInt(-1);
    if (t_in.dim() >= 2)
      for (int64_t d = 0; d < t_in.dim(); ++d) shape[size_t(g.dim() - t_in.dim() + d)] = t_in.sym_size(d);
    const at::Tensor t = saved[0].reshape({-1}).to(table.device(), at::kLong);
    at::Tensor ab = table.index_select(0, t.clamp(0, c10::Scalar(T - 1))).to(at::kDouble);
    ab = at::where((t >= 0) & (t < c10::Scalar(T)), ab, at::full_like(ab, std::nan(""))).reshape_symint(shape);
    out[0] = g * ab.sqrt().to(g.scalar_type());  // x_t has x0's shape
    if (saved[2].defined()) {
      const at::Tensor gn = g * (1 - ab).sqrt().to(g.scalar_type());
      out[3] = gn.sym_sizes().equals(saved[2].sym_sizes()) ? gn : at::sum_to(gn, saved[2].sym_sizes());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> q_sample_autograd(const at::Tensor& x0, const at::Tensor& t,
                                                     const at::Tensor& table, const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Generator>& generator, int64_t seed,
                                                     int64_t offset, const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step) {
  if (!needs_grad(x0, nullptr, noise)) {
    static auto op = op_handle("diffkern::q_sample").typed<QSampleSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x0, t, table, noise, generator, seed, offset, seeds, step_t, step);
  }
  auto r = QSampleFn::apply(x0, t, table, noise, generator, seed, offset, seeds, step_t, step);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, Autograd, m) {
  m.impl("ddim_step", &ddim_step_autograd);
  m.impl("ddpm_step", &ddpm_step_autograd);
  m.impl("langevin_step", &langevin_step_autograd);
  m.impl("step_backward", &step_backward_autograd);
  m.impl("q_sample", &q_sample_autograd);
}

}  // namespace diffkern
