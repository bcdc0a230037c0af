// Every diffkern op's schema, in one place. Implementations register per backend in
// cpu/*.cpp and cuda/*.cpp; fake (meta) kernels live in diffkern/ops.py; autograd in
// autograd.cpp (q_sample's in diffkern/ops.py).
//
// Conventions: t / t_prev are 1-D int64 (length 1 or the batch size) on the op's device,
// t_prev absent meaning t - 1 (no extra kernel to form it);
// alphas_cumprod is the float32 table; prediction_type 0/1/2 = epsilon/sample/v_prediction;
// variance 0/1 = fixed_small/fixed_large; clip_sample <= 0 means no clipping. Noise is
// `noise` when given, else drawn in-kernel: from `generator`'s Philox state on CUDA
// (graph-safe), from a CPU generator's next two 64-bit words on the CPU, else keyed by
// (seed, offset) (see csrc/kernels/philox.h).
#include <Python.h>
#include <torch/csrc/Generator.h>
#include <torch/library.h>

#include "common.h"

namespace {
// diffkern._C.cpu_key(generator) -> (seed, offset) as int64: the key of the next draw from a
// CPU generator (common.h cpu_philox_key), for the Python front door. A plain C call costs
// ~0.1 us where passing the generator through torch.ops costs ~2.5 us.
PyObject* cpu_key(PyObject* /*module*/, PyObject* obj) {
  if (!THPGenerator_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "generator must be a torch.Generator");
    return nullptr;
  }
  const at::Generator gen = reinterpret_cast<THPGenerator*>(obj)->cdata;
  if (gen.device().type() != c10::DeviceType::CPU) {
    PyErr_SetString(PyExc_TypeError, "cpu_key needs a CPU generator");
    return nullptr;
  }
  diffkern::PhiloxKey key{};
  Py_BEGIN_ALLOW_THREADS  // the generator's lock is taken without the GIL held
  key = diffkern::cpu_philox_key(gen, 0, 0);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(LL)", static_cast<long long>(key.seed), static_cast<long long>(key.offset));
}

PyMethodDef methods[] = {{"cpu_key", cpu_key, METH_O, "(seed, offset) of the next draw from a CPU generator"},
                         {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import diffkern._C` loads this library: the ops register themselves; cpu_key is the
// one Python-level function.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
      "int offset) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, float eta, "
      "int prediction_type, float clip_sample, Tensor? noise, Generator? generator, int seed, int offset) -> Tensor");
  m.def(
      "ddpm_step(Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, int variance, "
      "int prediction_type, float clip_sample, Tensor? noise, Generator? generator, int seed, int offset) -> Tensor");
  m.def(
      "step_backward(Tensor grad, Tensor x, Tensor model_output, Tensor t, Tensor? t_prev, Tensor alphas_cumprod, "
      "int kind, float eta, int variance, int prediction_type, float clip_sample, bool noise_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "langevin_step(Tensor x, Tensor score, float step_size, Tensor? noise, Generator? generator, int seed, "
      "int offset) -> Tensor");
  // Per-sample keyed normals (seeds=, step=), float32 (batch, inner) on seeds' device:
  // step_t (one int64, read on the device) when given, else step.
  m.def("keyed_normal(Tensor seeds, Tensor? step_t, int step, int batch, int inner) -> Tensor");
  m.def(
      "gmm_annealed_langevin(Tensor x, Tensor weights, Tensor means, Tensor stds, Tensor sigmas, int n_steps_each, "
      "float step_lr, bool denoise, Generator? generator, int seed, int offset) -> Tensor");
}
