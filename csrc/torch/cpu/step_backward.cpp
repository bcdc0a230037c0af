// Fused backward of ddim_step / ddpm_step: one pass producing dL/dx, dL/dm (and dL/dnoise
// when asked), from the same coefficients as the forward.
#include "../validate.h"
#include "elementwise.h"

namespace diffkern {

namespace {
template <class T, class Op>
void backward_loop(const Op& op, const Operand& g, const Operand& x, const Operand& m, T* gx, T* gm, T* gz,
                   int64_t numel, const LevelMap& levels, bool has_clip, double clip) {
  using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const StepCoeffs<C> shared = cast_coeffs<C>(op.template coeffs<double>(0));
  const int64_t nchunks = (numel + cpu::kChunk - 1) / cpu::kChunk;
  at::parallel_for(0, nchunks, 16, [&](int64_t cbeg, int64_t cend) {
    StepCoeffs<C> k = shared;
    int64_t cached = 0;
    const int64_t run = levels.varies ? levels.run : numel;
    for (int64_t c = cbeg; c < cend; ++c) {
      const int64_t e1 = std::min(numel, (c + 1) * cpu::kChunk);
      for (int64_t e = c * cpu::kChunk; e < e1;) {
        const int64_t q = e / run;
        const int64_t r1 = std::min(e1, (q + 1) * run);
        if (levels.varies && levels.of_run(q) != cached) {
          const int64_t li = levels.of_run(q);
          if (!op.same_levels(li, cached)) k = cast_coeffs<C>(op.template coeffs<double>(li));
          cached = li;
        }
        if (g.contiguous && x.contiguous && m.contiguous) {  // the common case, vectorized
          const T *gp = static_cast<const T*>(g.data), *xp = static_cast<const T*>(x.data),
                  *mp = static_cast<const T*>(m.data);
#pragma omp simd
          for (int64_t i = e; i < r1; ++i) {
            C dx, dm;
            step_backward<C>(k, C(xp[i]), C(mp[i]), C(gp[i]), has_clip, C(clip), &dx, &dm);
            gx[i] = T(dx);
            gm[i] = T(dm);
          }
          if (gz) {
#pragma omp simd
            for (int64_t i = e; i < r1; ++i) gz[i] = T(k.std * C(gp[i]));
          }
        } else {
          for (int64_t i = e; i < r1; ++i) {
            C dx, dm;
            const C gi = C(cpu::at_<T>(g, i));
            step_backward<C>(k, C(cpu::at_<T>(x, i)), C(cpu::at_<T>(m, i)), gi, has_clip, C(clip), &dx, &dm);
            gx[i] = T(dx);
            gm[i] = T(dm);
            if (gz) gz[i] = T(k.std * gi);
          }
        }
        e = r1;
      }
    }
  });
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& t,
    const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, int64_t kind, double eta, int64_t variance,
    int64_t prediction_type, double clip_sample, bool noise_grad) {
  const validate::Step s = validate::backward_step(grad, x_in, model_output, alphas_cumprod, t, t_prev, kind, eta,
                                                   variance, prediction_type);
  const at::Tensor& x = s.x;
  const at::IntArrayRef shape = x.sizes();
  at::Tensor gx = cpu::empty_output(shape, x.options());
  at::Tensor gm = cpu::empty_output(shape, x.options());
  at::Tensor gz = noise_grad ? cpu::empty_output(shape, x.options()) : at::empty({0}, x.options());
  const int64_t numel = gx.numel();
  if (numel == 0) return {gx, gm, gz};
  const Operand og = make_operand(validate::cast(grad, s.dtype), shape), ox = make_operand(x, shape),
                om = make_operand(s.m, shape);
  const TimestepArgs ts = timestep_args(alphas_cumprod, s.ts.t, s.ts.t_prev);
  const bool has_clip = clip_sample > 0;
  const LevelMap levels = level_map(s.ts.t.sizes(), shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffkern_step_backward", [&] {
    scalar_t* pz = noise_grad ? gz.data_ptr<scalar_t>() : nullptr;
    if (kind == 0) {
      const DdimOp op{ts, eta, int(prediction_type), has_clip, clip_sample};
      backward_loop<scalar_t>(op, og, ox, om, gx.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), pz, numel, levels,
                              has_clip, clip_sample);
    } else {
      const DdpmOp op{ts, int(variance), int(prediction_type), has_clip, clip_sample};
      backward_loop<scalar_t>(op, og, ox, om, gx.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), pz, numel, levels,
                              has_clip, clip_sample);
    }
  });
  return {gx, gm, gz};
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) { m.impl("step_backward", &step_backward_cpu); }

}  // namespace diffkern
