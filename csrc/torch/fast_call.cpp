// The eager entry of the public step ops: diffkern/ops.py calls these module functions
// instead of torch.ops.diffkern.<op> when not under torch.compile and the inputs are plain
// tensors. They unpack the Python objects and call the same dispatcher op (autograd, the
// backend kernels and their checks, dispatch modes: all unchanged); what they skip is
// torch.ops' Python layer and its argument parsing by schema, ~3-5 us of a small step.
//
// Arguments are what the schema takes, already converted by ops.py (timesteps as tensors,
// enums as ints), with the per-sample keys (seeds, step_t, step) optional at the end; a
// generator of None means the default generator of x's device when the op draws noise
// from a generator (keyed in the kernel, see cpu_generator.h).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>

#include "cpu_generator.h"

namespace diffkern {
namespace {

using OptTensor = std::optional<at::Tensor>;
using OptGen = std::optional<at::Generator>;

c10::OperatorHandle op_handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// A borrowed Python object -> tensor; false (with a TypeError set) when it is not one.
bool tensor_arg(PyObject* o, const char* name, at::Tensor* out) {
  if (!THPVariable_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a torch.Tensor, got %s", name, Py_TYPE(o)->tp_name);
    return false;
  }
  *out = THPVariable_Unpack(o);
  return true;
}

bool opt_tensor_arg(PyObject* o, const char* name, OptTensor* out) {
  if (o == Py_None) return true;
  at::Tensor t;
  if (!tensor_arg(o, name, &t)) return false;
  *out = std::move(t);
  return true;
}

bool generator_arg(PyObject* o, OptGen* out) {
  if (o == Py_None) return true;
  if (!PyObject_TypeCheck(o, reinterpret_cast<PyTypeObject*>(THPGeneratorClass))) {
    PyErr_Format(PyExc_TypeError, "generator must be a torch.Generator, got %s", Py_TYPE(o)->tp_name);
    return false;
  }
  *out = reinterpret_cast<THPGenerator*>(o)->cdata;
  return true;
}

// The generator a drawing op uses: the given one, else the default one of x's device.
OptGen drawing_generator(const OptGen& given, const at::Tensor& x, bool draws) {
  if (!draws || given.has_value()) return given;
  if (x.device().is_cpu() || x.device().is_cuda()) return at::globalContext().defaultGenerator(x.device());
  return given;
}

// torch's own translation of C++ errors (TORCH_CHECK_VALUE -> ValueError, ..., a Python
// exception raised in a Python kernel or mode kept as it was) and of warnings.
template <class F>
PyObject* guarded(F&& f) {
  HANDLE_TH_ERRORS
  return f();
  END_HANDLE_TH_ERRORS
}

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

// _ddim_step(x, model_output, t, t_prev, table, eta, prediction_type, clip_sample, noise, generator)
PyObject* ddim_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *ot, *otp, *otab, *onoise, *ogen;
  double eta, clip;
  long pred;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOOdldOO|OOL", &ox, &om, &ot, &otp, &otab, &eta, &pred, &clip, &onoise, &ogen, &oseeds, &ostep, &step))
    return nullptr;
  at::Tensor x, m, t, tab;
  OptTensor tp, noise;
  OptTensor seeds, step_t;
  OptGen gen;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "eps", &m) || !tensor_arg(ot, "t", &t) ||
      !opt_tensor_arg(otp, "t_prev", &tp) || !tensor_arg(otab, "alphas_cumprod", &tab) ||
      !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  return guarded([&] {
    static auto op = op_handle("diffkern::ddim_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const at::Tensor&, double, int64_t, double, const OptTensor&,
                                           const OptGen&, int64_t, int64_t, const OptTensor&,
                                           const OptTensor&, int64_t)>();
    const OptGen g = drawing_generator(gen, x, eta > 0 && !noise.has_value() && !seeds.has_value());
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, m, t, tp, tab, eta, pred, clip, noise, g, 0, 0, seeds, step_t, step);
    }
    return wrap(std::move(out));
  });
}

// _ddpm_step(x, model_output, t, t_prev, table, variance, prediction_type, clip_sample, noise, generator)
PyObject* ddpm_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *ot, *otp, *otab, *onoise, *ogen;
  double clip;
  long var, pred;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOOlldOO|OOL", &ox, &om, &ot, &otp, &otab, &var, &pred, &clip, &onoise, &ogen, &oseeds, &ostep, &step))
    return nullptr;
  at::Tensor x, m, t, tab;
  OptTensor tp, noise;
  OptTensor seeds, step_t;
  OptGen gen;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "eps", &m) || !tensor_arg(ot, "t", &t) ||
      !opt_tensor_arg(otp, "t_prev", &tp) || !tensor_arg(otab, "alphas_cumprod", &tab) ||
      !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  return guarded([&] {
    static auto op = op_handle("diffkern::ddpm_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const at::Tensor&, int64_t, int64_t, double, const OptTensor&,
                                           const OptGen&, int64_t, int64_t, const OptTensor&,
                                           const OptTensor&, int64_t)>();
    const OptGen g = drawing_generator(gen, x, !noise.has_value() && !seeds.has_value());
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, m, t, tp, tab, var, pred, clip, noise, g, 0, 0, seeds, step_t, step);
    }
    return wrap(std::move(out));
  });
}

// _langevin_step(x, score, step_size, noise, generator)
PyObject* langevin_step(PyObject*, PyObject* args) {
  PyObject *ox, *os, *onoise, *ogen;
  double step_size;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOdOO|OOL", &ox, &os, &step_size, &onoise, &ogen, &oseeds, &ostep, &step)) return nullptr;
  at::Tensor x, s;
  OptTensor noise;
  OptTensor seeds, step_t;
  OptGen gen;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(os, "score", &s) || !opt_tensor_arg(onoise, "noise", &noise) ||
      !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  return guarded([&] {
    static auto op = op_handle("diffkern::langevin_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const OptTensor&,
                                           const OptGen&, int64_t, int64_t, const OptTensor&,
                                           const OptTensor&, int64_t)>();
    const OptGen g = drawing_generator(gen, x, !noise.has_value() && !seeds.has_value());
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, s, step_size, noise, g, 0, 0, seeds, step_t, step);
    }
    return wrap(std::move(out));
  });
}

// _q_sample(x0, t, table, noise, generator) -> (x_t, drawn noise or an empty tensor)
PyObject* q_sample(PyObject*, PyObject* args) {
  PyObject *ox, *ot, *otab, *onoise, *ogen;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOO|OOL", &ox, &ot, &otab, &onoise, &ogen, &oseeds, &ostep, &step)) return nullptr;
  at::Tensor x, t, tab;
  OptTensor noise;
  OptTensor seeds, step_t;
  OptGen gen;
  if (!tensor_arg(ox, "x0", &x) || !tensor_arg(ot, "t", &t) || !tensor_arg(otab, "alphas_cumprod", &tab) ||
      !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  return guarded([&]() -> PyObject* {
    static auto op = op_handle("diffkern::q_sample")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const OptTensor&, const OptGen&,
                                                                   int64_t, int64_t, const OptTensor&, const OptTensor&,
                                                                   int64_t)>();
    const OptGen g = drawing_generator(gen, x, !noise.has_value() && !seeds.has_value());
    std::tuple<at::Tensor, at::Tensor> r;
    {
      pybind11::gil_scoped_release no_gil;
      r = op.call(x, t, tab, noise, g, 0, 0, seeds, step_t, step);
    }
    PyObject* a = wrap(std::move(std::get<0>(r)));
    if (!a) return nullptr;
    PyObject* b = noise.has_value() ? (Py_INCREF(onoise), onoise) : wrap(std::move(std::get<1>(r)));
    if (!b) {
      Py_DECREF(a);
      return nullptr;
    }
    PyObject* tup = PyTuple_Pack(2, a, b);
    Py_DECREF(a);
    Py_DECREF(b);
    return tup;
  });
}

// _cpu_generator_key(generator) -> (seed, offset), advancing it (diffkern/_rng.py's rule).
PyObject* cpu_key(PyObject*, PyObject* arg) {
  OptGen gen;
  if (arg != Py_None && !generator_arg(arg, &gen)) return nullptr;
  return guarded([&] {
    const at::Generator g = gen.has_value() ? *gen : at::detail::getDefaultCPUGenerator();
    const auto [seed, offset] = cpu_generator_key(g);
    // unsigned, as _rng.py_cpu_generator_key returns them
    return Py_BuildValue("(KK)", static_cast<unsigned long long>(seed), static_cast<unsigned long long>(offset));
  });
}

PyMethodDef kMethods[] = {
    {"_ddim_step", ddim_step, METH_VARARGS, "eager ddim_step (see diffkern/ops.py)"},
    {"_ddpm_step", ddpm_step, METH_VARARGS, "eager ddpm_step (see diffkern/ops.py)"},
    {"_langevin_step", langevin_step, METH_VARARGS, "eager langevin_step (see diffkern/ops.py)"},
    {"_q_sample", q_sample, METH_VARARGS, "eager q_sample (see diffkern/ops.py)"},
    {"_cpu_generator_key", cpu_key, METH_O, "(seed, offset) of the next draw from a CPU generator"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_call_methods() { return kMethods; }

}  // namespace diffkern
