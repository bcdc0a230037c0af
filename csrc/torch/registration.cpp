// Every diffkern op's schema, in one place. Implementations register per backend in
// cpu/*.cpp and cuda/*.cpp; fake (meta) kernels live in diffkern/ops.py; autograd in
// autograd.cpp (q_sample's in diffkern/ops.py).
//
// Conventions: t / t_prev are 1-D int64 (length 1 or the batch size) on the op's device,
// t_prev absent meaning t - 1 (no extra kernel to form it);
// alphas_cumprod is the float32 table; prediction_type 0/1/2 = epsilon/sample/v_prediction;
// variance 0/1 = fixed_small/fixed_large; clip_sample <= 0 means no clipping. Noise is
// `noise` when given, else drawn in-kernel: from `generator`'s Philox state on CUDA
// (graph-safe), else keyed by (seed, offset) (see csrc/kernels/philox.h).
// A CPU generator given to an op is keyed by the op itself (csrc/torch/cpu_generator.h),
// and then (seed, offset) are ignored. The DDPM-family ops check every argument in the
// backend kernels (csrc/torch/validate.h): raw calls get the same errors as the public
// functions. The sampler-family ops check there their tensors' dtypes, devices and shapes
// and their levels' layouts (levels.h); their values (ranges, orderings) are checked by
// the public functions in Python (diffkern/_validate.py), not yet by the raw ops.
// seeds / step_t / step: per-sample keys instead of a generator (csrc/torch/common.h
// keyed_args): the kernel draws element j of sample b from (seeds[b], step).
#include <Python.h>
#include <torch/library.h>

namespace diffkern {
PyMethodDef* fast_call_methods();  // fast_call.cpp: the eager entry of the public step ops
}

extern "C" {
// `import diffkern._C` loads this library (the ops register themselves) and gives the
// module the eager entry points of fast_call.cpp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, diffkern::fast_call_methods()};
  return PyModule_Create(&def);
}
}

namespace diffkern {
bool built_with_cuda() {
#ifdef DIFFKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace diffkern

TORCH_LIBRARY(diffkern, m) {
  m.def("built_with_cuda() -> bool", &diffkern::built_with_cuda);
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? noise, Generator? generator, int seed, "
      "int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, float eta, "
      "int prediction_type, float clip_sample, Tensor? noise, Generator? generator, int seed, int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor");
  m.def(
      "ddpm_step(Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, int variance, "
      "int prediction_type, float clip_sample, Tensor? noise, Generator? generator, int seed, int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor");
  m.def(
      "step_backward(Tensor grad, Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, "
      "int kind, float eta, int variance, int prediction_type, float clip_sample, bool noise_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "langevin_step(Tensor x, Tensor score, float step_size, Tensor? noise, Generator? generator, int seed, "
      "int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor");
  // Per-sample keyed normals (seeds=, step=), float32 (batch, inner) on seeds' device:
  // step_t (one int64, read on the device) when given, else step.
  m.def("keyed_normal(Tensor seeds, Tensor? step_t, int step, int batch, int inner) -> Tensor");
  m.def(
      "gmm_annealed_langevin(Tensor x, Tensor weights, Tensor means, Tensor stds, Tensor sigmas, int n_steps_each, "
      "float step_lr, bool denoise, Generator? generator, int seed, int offset) -> Tensor");

  // Sampler-family ops (csrc/kernels/<op>.h). Each scalar sigma* is the number
  // `sigma`, or when `sigma_t` is given that 1-D float32/float64 tensor of length 1 or B on
  // x's device. prediction_type as above (k-diffusion's VE forms, see csrc/kernels/op_base.h);
  // solver_type 0/1 = midpoint/heun. A second output not asked for is empty.
  m.def(
      "euler_step(Tensor x, Tensor model_output, Tensor? sigma_t, Tensor? sigma_next_t, float sigma, "
      "float sigma_next, float eta, float s_noise, float gamma, int prediction_type, Tensor? noise, "
      "Generator? generator, int seed, int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor");
  m.def(
      "heun_step(Tensor x, Tensor denoised, Tensor x_proposal, Tensor denoised_proposal, Tensor? sigma_t, "
      "Tensor? sigma_next_t, float sigma, float sigma_next, int prediction_type) -> Tensor");
  m.def(
      "dpmpp_2m_step(Tensor x, Tensor model_output, Tensor? old_denoised, Tensor? sigma_t, Tensor? sigma_next_t, "
      "Tensor? sigma_prev_t, float sigma, float sigma_next, float sigma_prev, int prediction_type, int solver_type, "
      "bool variance_preserving, bool return_denoised) -> (Tensor, Tensor)");
  m.def(
      "flow_step(Tensor x, Tensor velocity, Tensor? sigma_t, Tensor? sigma_next_t, float sigma, float sigma_next, "
      "bool stochastic, Tensor? noise, Generator? generator, int seed, int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor");
  m.def(
      "flow_q_sample(Tensor x0, Tensor? sigma_t, float sigma, Tensor? noise, Generator? generator, int seed, "
      "int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> (Tensor, Tensor)");
  m.def(
      "lcm_step(Tensor x, Tensor model_output, Tensor t, Tensor t_prev, Tensor alphas_cumprod, "
      "float timestep_scaling, float sigma_data, int prediction_type, float clip_sample, bool renoise, "
      "Tensor? noise, Generator? generator, int seed, int offset, bool return_denoised, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> (Tensor, Tensor)");
  m.def(
      "lcm_step_backward(Tensor grad, Tensor? grad_denoised, Tensor x, Tensor model_output, Tensor t, "
      "Tensor t_prev, Tensor alphas_cumprod, float timestep_scaling, float sigma_data, int prediction_type, "
      "float clip_sample) -> (Tensor, Tensor)");
  // The multistep solvers' update (LinearOp): `outputs` linear combinations of the inputs
  // (x first) and one noise draw; coefficients as linear_op (csrc/torch/sampler_args.h)
  // reads them. Noise as the other ops, used only when `noisy`.
  m.def(
      "linear_step(Tensor[] inputs, float[] coeffs, Tensor? coeffs_t, int outputs, bool noisy, Tensor? noise, "
      "Generator? generator, int seed, int offset, Tensor? seeds=None, Tensor? step_t=None, int step=0) -> Tensor[]");
  // Their backward coefficients (sampler_autograd.cpp): (nb, 10) float64 on x's device,
  // nb = B when a level is per-sample else 1; row b = d out / d (in0..in3, z), then the
  // same for the second output.
  m.def(
      "euler_step_jacobian(Tensor x, Tensor? sigma_t, Tensor? sigma_next_t, float sigma, float sigma_next, "
      "float eta, float s_noise, float gamma, int prediction_type) -> Tensor");
  m.def(
      "heun_step_jacobian(Tensor x, Tensor? sigma_t, Tensor? sigma_next_t, float sigma, float sigma_next, "
      "int prediction_type) -> Tensor");
  m.def(
      "dpmpp_2m_step_jacobian(Tensor x, Tensor? sigma_t, Tensor? sigma_next_t, Tensor? sigma_prev_t, float sigma, "
      "float sigma_next, float sigma_prev, int prediction_type, int solver_type, bool variance_preserving, "
      "bool has_old) -> Tensor");
  m.def(
      "flow_step_jacobian(Tensor x, Tensor? sigma_t, Tensor? sigma_next_t, float sigma, float sigma_next, "
      "bool stochastic) -> Tensor");
  m.def("flow_q_sample_jacobian(Tensor x0, Tensor? sigma_t, float sigma) -> Tensor");
  m.def(
      "lcm_step_jacobian(Tensor x, Tensor t, Tensor t_prev, Tensor alphas_cumprod, float timestep_scaling, "
      "float sigma_data, int prediction_type, bool renoise) -> Tensor");
}
