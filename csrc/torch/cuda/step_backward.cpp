#include "common.h"

namespace diffkern {

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& model_output, const at::Tensor& t,
    const std::optional<at::Tensor>& t_prev, const at::Tensor& alphas_cumprod, int64_t kind, double eta,
    int64_t variance, int64_t prediction_type, double clip_sample, bool noise_grad) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const validate::Step v = validate::backward_step(grad, x_in, model_output, alphas_cumprod, t, t_prev, kind, eta,
                                                   variance, prediction_type);
  const at::Tensor& x = v.x;
  const at::IntArrayRef shape = x.sizes();
  at::Tensor gx = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gm = at::empty_like(gx);
  at::Tensor gz = noise_grad ? at::empty_like(gx) : at::empty({0}, x.options());
  if (x.numel() == 0) return {gx, gm, gz};
  const Operand og = make_operand(validate::cast(grad, v.dtype), shape), ox = make_operand(x, shape),
                om = make_operand(v.m, shape);
  cuda::BackwardLaunch p;
  p.dtype = cuda_binding::dtype_of(x);
  p.numel = gx.numel();
  p.grad = cuda_binding::operand(og);
  p.x = cuda_binding::operand(ox);
  p.m = cuda_binding::operand(om);
  p.grad_x = gx.data_ptr();
  p.grad_m = gm.data_ptr();
  p.grad_noise = noise_grad ? gz.data_ptr() : nullptr;
  p.levels = level_map(v.ts.t.sizes(), shape);
  p.device = x.get_device();
  const TimestepArgs ts = timestep_args(alphas_cumprod, v.ts.t, v.ts.t_prev);
  const bool has_clip = clip_sample > 0;
  const DdimOp ddim{ts, eta, int(prediction_type), has_clip, clip_sample};
  const DdpmOp ddpm{ts, int(variance), int(prediction_type), has_clip, clip_sample};
  cuda::launch_step_backward(p, int(kind), ddim, ddpm, c10::cuda::getCurrentCUDAStream());
  DIFFKERN_LAUNCH_CHECK();
  return {gx, gm, gz};
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("step_backward", &step_backward_cuda); }

}  // namespace diffkern
