// The checks of validate.h. Cheap by construction: metadata comparisons, and loops over
// t / t_prev only when they sit on the CPU (a few values).
#include "validate.h"

#include "levels.h"

#include <cmath>

namespace diffkern {
namespace validate {

namespace {

bool is_floating(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

bool broadcasts_to(at::IntArrayRef shape, at::IntArrayRef target) {
  if (shape.size() > target.size()) return false;
  const size_t off = target.size() - shape.size();
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != 1 && shape[i] != target[off + i]) return false;
  return true;
}

// One integer tensor of timesteps: dtype, layout (levels.h) and device (no values).
void timestep_meta(const at::Tensor& t, const at::Tensor& x, const char* name, at::DimVector& common) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s != at::kBool, name, " must be an int or an integer tensor, got a bool tensor");
  TORCH_CHECK_TYPE(at::isIntegralType(s, /*includeBool=*/false), name, " must be an integer tensor, got ", s,
                   " (timesteps are indices)");
  widen_shape(common, level_shape(t, x, name));
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
                    x.device());
}

// int64, contiguous, of the common level shape (every entry present), on `device`.
at::Tensor normalized(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, c10::Device device,
                      const char* name) {
  at::Tensor v = t.scalar_type() == at::kLong ? t : t.to(at::kLong);
  v = level_array(v, x, shape, name, /*full=*/true);
  if (v.device() != device) v = v.to(device, /*non_blocking=*/true);
  return v;
}

}  // namespace

void floating(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_floating(x.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   x.scalar_type());
}

void like(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.device() == x.device(), name, " is on ", other.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(is_floating(other.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   other.scalar_type());
  TORCH_CHECK_VALUE(other.sizes() == x.sizes() || broadcasts_to(other.sizes(), x.sizes()), name, " of shape ",
                    other.sizes(), " does not broadcast to x's shape ", x.sizes());
}

void nonneg(double v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0 && std::isfinite(v), name, " must be a finite number >= 0, got ", v);
}

void positive(double v, const char* name) {
  TORCH_CHECK_VALUE(v > 0 && std::isfinite(v), name, " must be a finite number > 0, got ", v);
}

void prediction_type(int64_t p) {
  TORCH_CHECK_VALUE(p >= 0 && p <= 2, "prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ", p);
}

void variance(int64_t v) {
  TORCH_CHECK_VALUE(v == 0 || v == 1, "variance must be 0 (fixed_small) or 1 (fixed_large), got ", v);
}

void noise_or_generator(const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator) {
  TORCH_CHECK_VALUE(!(noise.has_value() && generator.has_value()), "pass either noise or generator, not both");
}

void generator_device(const std::optional<at::Generator>& generator, const at::Tensor& x) {
  if (!generator.has_value() || !generator->defined()) return;
  const c10::DeviceType g = generator->device().type();
  // A CPU generator may key noise drawn anywhere; a CUDA one only noise drawn on CUDA.
  TORCH_CHECK_VALUE(g == c10::DeviceType::CPU || (g == x.device().type()), "generator is on ", generator->device(),
                    " but x is on ", x.device());
}

at::ScalarType result_type(const at::Tensor& x, const at::Tensor* m, const std::optional<at::Tensor>& noise) {
  at::ScalarType s = x.scalar_type();
  if (m && m->scalar_type() != s) s = at::promote_types(s, m->scalar_type());
  if (noise.has_value() && noise->scalar_type() != s) s = at::promote_types(s, noise->scalar_type());
  return s;
}

at::MemoryFormat output_format(const at::Tensor& x) {
  // Only the channels-last family is kept: other strided inputs (transposed, sliced,
  // broadcast) give contiguous outputs, as before.
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

void table(const at::Tensor& table, const at::Tensor& x) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, "alphas_cumprod must be a float32 tensor, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 1 && table.numel() >= 1 && table.is_contiguous(),
                    "alphas_cumprod must be a contiguous 1-D tensor with one entry per timestep, got shape ",
                    table.sizes());
  TORCH_CHECK_VALUE(table.device() == x.device(), "alphas_cumprod is on ", table.device(), " but x is on ",
                    x.device());
}

Timesteps timesteps(const at::Tensor& x, const at::Tensor& tab, const at::Tensor& t,
                    const std::optional<at::Tensor>& t_prev, int64_t prediction) {
  table(tab, x);
  const int64_t T = tab.numel();
  at::DimVector common(size_t(x.dim()), 1);
  timestep_meta(t, x, "t", common);
  if (t_prev.has_value()) timestep_meta(*t_prev, x, "t_prev", common);
  const bool t_host = t.device().is_cpu(), tp_host = t_prev.has_value() && t_prev->device().is_cpu();
  // Values read on the host, in int64, as arrays of the common shape (whatever integer
  // type and layout came in), so that t and t_prev compare entry by entry.
  at::Tensor th, tph;
  if (t_host) {
    th = normalized(t, x, common, t.device(), "t");
    const int64_t* p = th.data_ptr<int64_t>();
    for (int64_t i = 0; i < th.numel(); ++i)
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < T, "t has an entry outside [0, ", T, "): t=", p[i], " for a schedule of ",
                        T, " timesteps");
    if (prediction == 0 && tab.device().is_cpu()) {
      const float* a = tab.data_ptr<float>();
      for (int64_t i = 0; i < th.numel(); ++i)
        TORCH_CHECK_VALUE(a[p[i]] > 0, "epsilon prediction is undefined at t=", p[i],
                          ", where alphas_cumprod[t] == 0 (a zero-terminal-SNR schedule); use "
                          "prediction_type='v_prediction' or 'sample'");
    }
  }
  if (tp_host) {
    tph = normalized(*t_prev, x, common, t_prev->device(), "t_prev");
    const int64_t* q = tph.data_ptr<int64_t>();
    for (int64_t i = 0; i < tph.numel(); ++i)
      TORCH_CHECK_VALUE(q[i] < T, "t_prev has an entry outside [-1, ", T, "): t_prev=", q[i],
                        " (negative means the final step)");
    if (t_host) {
      const int64_t* p = th.data_ptr<int64_t>();
      for (int64_t i = 0; i < th.numel(); ++i)
        TORCH_CHECK_VALUE(q[i] < p[i], "t_prev must be smaller than t (sampling goes from noise towards data): t=",
                          p[i], ", t_prev=", q[i]);
    }
  }
  Timesteps out;
  out.t = t_host ? th.to(x.device(), /*non_blocking=*/true) : normalized(t, x, common, x.device(), "t");
  if (t_prev.has_value())
    out.t_prev = tp_host ? tph.to(x.device(), /*non_blocking=*/true) : normalized(*t_prev, x, common, x.device(), "t_prev");
  return out;
}

at::Tensor cast(const at::Tensor& v, at::ScalarType dtype) {
  return v.scalar_type() == dtype ? v : v.to(dtype);
}

std::optional<at::Tensor> cast(const std::optional<at::Tensor>& v, at::ScalarType dtype) {
  if (!v.has_value()) return v;
  return cast(*v, dtype);
}

at::Tensor in_format(at::Tensor out, at::MemoryFormat format) {
  return format == at::MemoryFormat::Contiguous ? out : out.contiguous(format);
}

Step step(const at::Tensor& x, const char* x_name, const at::Tensor* m, const char* m_name,
          const std::optional<at::Tensor>& noise, bool noise_used, const std::optional<at::Generator>& generator,
          const at::Tensor* tab, const at::Tensor* t, const std::optional<at::Tensor>* t_prev, int64_t prediction) {
  floating(x, x_name);
  if (m) like(x, *m, m_name);
  if (noise.has_value()) like(x, *noise, "noise");
  noise_or_generator(noise, generator);
  generator_device(generator, x);
  Step s;
  s.dtype = result_type(x, m, noise_used ? noise : std::nullopt);
  s.format = output_format(x);
  if (t) s.ts = timesteps(x, *tab, *t, t_prev ? *t_prev : std::nullopt, prediction);
  s.x = x;
  if (m) s.m = *m;
  if (noise_used) s.noise = noise;
  s.empty = x.numel() == 0;
  return s;
}

Step backward_step(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& m, const at::Tensor& table,
                   const at::Tensor& t, const std::optional<at::Tensor>& t_prev, int64_t kind, double eta,
                   int64_t variance_type, int64_t prediction) {
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, "kind must be 0 (ddim_step) or 1 (ddpm_step), got ", kind);
  nonneg(eta, "eta");
  variance(variance_type);
  prediction_type(prediction);
  floating(x, "x");
  like(x, grad, "grad");
  // The zero-SNR rule was the forward's: a backward through a NaN forward stays NaN.
  Step s = step(x, "x", &m, kModelOutput, std::nullopt, false, std::nullopt, &table, &t, &t_prev, -1);
  s.x = cast(s.x, s.dtype);
  s.m = cast(s.m, s.dtype);
  return s;
}

at::Tensor empty_result(const Step& s, const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().dtype(s.dtype).memory_format(s.format));
}

Operands operands(c10::ArrayRef<NamedInput> inputs, const std::optional<at::Tensor>& noise, bool noise_used,
                  const std::optional<at::Generator>& generator) {
  TORCH_CHECK(!inputs.empty() && inputs.size() <= size_t(Operands::kMax) && inputs[0].first,
              "diffkern: 1 to ", Operands::kMax, " inputs, x first");
  const at::Tensor& x = *inputs[0].first;
  floating(x, inputs[0].second);
  Operands o;
  o.n = int(inputs.size());
  at::ScalarType dtype = x.scalar_type();
  for (size_t i = 1; i < inputs.size(); ++i) {
    if (!inputs[i].first) continue;
    like(x, *inputs[i].first, inputs[i].second);
    dtype = at::promote_types(dtype, inputs[i].first->scalar_type());
  }
  if (noise.has_value()) like(x, *noise, "noise");
  noise_or_generator(noise, generator);
  generator_device(generator, x);
  if (noise_used && noise.has_value()) dtype = at::promote_types(dtype, noise->scalar_type());
  o.dtype = dtype;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].first) o.in[i] = *inputs[i].first;
  if (noise_used) o.noise = noise;
  return o;
}

void solver_type(int64_t s) {
  TORCH_CHECK_VALUE(s == 0 || s == 1, "solver_type must be 0 (midpoint) or 1 (heun), got ", s);
}

void mixture(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& means, const at::Tensor& stds,
             const at::Tensor& sigmas, int64_t n_steps_each, double step_lr) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64 for the fused mixture chain, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have a last dimension D (points are x[..., :D])");
  const int64_t D = x.size(-1);
  for (const auto& [v, name] : {std::pair<const at::Tensor&, const char*>{weights, "weights"},
                                {means, "means"}, {stds, "stds"}, {sigmas, "sigmas"}}) {
    TORCH_CHECK_TYPE(is_floating(v.scalar_type()), name, " must be a floating-point tensor, got ", v.scalar_type());
    if (name[1] != 'i')  // sigmas may stay on the CPU
      TORCH_CHECK_VALUE(v.device() == x.device(), name, " is on ", v.device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() >= 1, "weights must have shape (K,), got ", weights.sizes());
  const int64_t K = weights.numel();
  TORCH_CHECK_VALUE(means.dim() == 2 && means.size(0) == K && means.size(1) == D, "means must have shape (K, D) = (",
                    K, ", ", D, "), got ", means.sizes());
  TORCH_CHECK_VALUE((stds.dim() == 2 && stds.size(0) == K && stds.size(1) == D) || (stds.dim() == 1 && stds.size(0) == K),
                    "stds must have shape (K, D) = (", K, ", ", D, ") or (K,) = (", K, ",), got ", stds.sizes());
  TORCH_CHECK_VALUE(sigmas.dim() <= 1 && sigmas.numel() >= 1, "sigmas must be a non-empty 1-D tensor, got shape ",
                    sigmas.sizes());
  TORCH_CHECK_VALUE(n_steps_each >= 1, "n_steps_each must be >= 1, got ", n_steps_each);
  positive(step_lr, "step_lr");
  if (sigmas.device().is_cpu()) {
    const at::Tensor s = sigmas.to(at::kDouble).contiguous();
    const double* p = s.data_ptr<double>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      TORCH_CHECK_VALUE(p[i] > 0 && std::isfinite(p[i]), "sigmas must be positive and finite");
      TORCH_CHECK_VALUE(i == 0 || p[i] < p[i - 1], "sigmas must be strictly descending (largest noise level first)");
    }
  }
  if (weights.device().is_cpu()) {
    const at::Tensor w = weights.to(at::kDouble).contiguous();
    const double* p = w.data_ptr<double>();
    double sum = 0;
    for (int64_t i = 0; i < K; ++i) {
      TORCH_CHECK_VALUE(p[i] >= 0, "weights must be non-negative and sum to 1");
      sum += p[i];
    }
    TORCH_CHECK_VALUE(std::abs(sum - 1.0) <= 1e-4, "weights must be non-negative and sum to 1, got a sum of ", sum);
  }
  if (stds.device().is_cpu()) {
    const at::Tensor s = stds.to(at::kDouble).contiguous();
    const double* p = s.data_ptr<double>();
    for (int64_t i = 0; i < s.numel(); ++i) TORCH_CHECK_VALUE(p[i] > 0, "stds must be positive");
  }
}

}  // namespace validate
}  // namespace diffkern
