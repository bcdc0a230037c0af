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

// (a, b) as a Python tuple; `b_given` (borrowed) in place of b when not null.
PyObject* pair(at::Tensor a, at::Tensor b, PyObject* b_given = nullptr) {
  PyObject* pa = wrap(std::move(a));
  if (!pa) return nullptr;
  PyObject* pb = b_given ? (Py_INCREF(b_given), b_given) : wrap(std::move(b));
  if (!pb) {
    Py_DECREF(pa);
    return nullptr;
  }
  PyObject* tup = PyTuple_Pack(2, pa, pb);
  Py_DECREF(pa);
  Py_DECREF(pb);
  return tup;
}

// (out, second) -> out, or the pair when `both`.
PyObject* one_or_pair(std::tuple<at::Tensor, at::Tensor> r, bool both) {
  if (!both) return wrap(std::move(std::get<0>(r)));
  return pair(std::move(std::get<0>(r)), std::move(std::get<1>(r)));
}

// A noising op's (x_t, noise): the caller's own noise when given (`given`, borrowed), not
// the op's empty placeholder.
PyObject* noised_pair(std::tuple<at::Tensor, at::Tensor> r, PyObject* given) {
  return pair(std::move(std::get<0>(r)), std::move(std::get<1>(r)), given);
}

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
    return noised_pair(std::move(r), noise.has_value() ? onoise : nullptr);
  });
}

// ---- the sampler families -------------------------------------------------------------
// Their levels come as the caller gave them (a Python number or a tensor) and become the
// schema's pair (tensor or None, number); a level that needs a gradient sends the call back
// to Python (NotImplemented: the native ops differentiate w.r.t. the tensors, not the levels).
enum class Arg { kOk, kError, kReference };

Arg level_arg(PyObject* o, const char* name, OptTensor* t, double* v) {
  *v = 0.0;
  if (PyFloat_CheckExact(o)) {
    *v = PyFloat_AS_DOUBLE(o);
    return Arg::kOk;
  }
  if (PyBool_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a real number or a floating tensor, got a bool", name);
    return Arg::kError;
  }
  if (THPVariable_Check(o)) {
    const at::Tensor& l = THPVariable_Unpack(o);
    if (!at::isFloatingType(l.scalar_type())) {
      if (l.scalar_type() == at::kBool)
        PyErr_Format(PyExc_TypeError, "%s must be a real number or a floating tensor, got a bool", name);
      else
        PyErr_Format(PyExc_TypeError, "%s must be a floating tensor, got torch.%s", name,
                     c10::toString(l.scalar_type()));
      return Arg::kError;
    }
    if (l.requires_grad()) return Arg::kReference;
    *t = l;
    return Arg::kOk;
  }
  if (PyNumber_Check(o) && !PyComplex_Check(o)) {
    const double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) return Arg::kError;
    *v = d;
    return Arg::kOk;
  }
  PyErr_Format(PyExc_TypeError, "%s must be a real number or a floating tensor, got %s", name, Py_TYPE(o)->tp_name);
  return Arg::kError;
}

// The level tensors the kernels read: float32/float64 (others widened, exactly).
void level_dtype(OptTensor& t) {
  if (t.has_value() && t->scalar_type() != at::kFloat && t->scalar_type() != at::kDouble) t = t->to(at::kDouble);
}

bool bool_arg(PyObject* o, const char* name, bool* out) {
  if (!PyBool_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a bool, got %s", name, Py_TYPE(o)->tp_name);
    return false;
  }
  *out = o == Py_True;
  return true;
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// _euler_step(x, denoised, sigma, sigma_next, eta, s_noise, gamma, prediction_type, noise, generator)
PyObject* euler_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *os, *osn, *onoise, *ogen;
  double eta, s_noise, gamma;
  long pred;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOdddlOO|OOL", &ox, &om, &os, &osn, &eta, &s_noise, &gamma, &pred, &onoise, &ogen,
                        &oseeds, &ostep, &step))
    return nullptr;
  at::Tensor x, m;
  OptTensor st, snt, noise, seeds, step_t;
  double s, sn;
  OptGen gen;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "denoised", &m) || !opt_tensor_arg(onoise, "noise", &noise) ||
      !generator_arg(ogen, &gen) || !opt_tensor_arg(oseeds, "seeds", &seeds) ||
      !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  for (const Arg a : {level_arg(os, "sigma", &st, &s), level_arg(osn, "sigma_next", &snt, &sn)}) {
    if (a == Arg::kError) return nullptr;
    if (a == Arg::kReference) return not_implemented();
  }
  return guarded([&] {
    static auto op = op_handle("diffkern::euler_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                           double, double, double, double, double, int64_t, const OptTensor&,
                                           const OptGen&, int64_t, int64_t, const OptTensor&, const OptTensor&,
                                           int64_t)>();
    level_dtype(st);
    level_dtype(snt);
    const OptGen g = drawing_generator(gen, x, (eta > 0 || gamma > 0) && !noise.has_value() && !seeds.has_value());
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, m, st, snt, s, sn, eta, s_noise, gamma, pred, noise, g, 0, 0, seeds, step_t, step);
    }
    return wrap(std::move(out));
  });
}

// _heun_step(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, prediction_type)
PyObject* heun_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *oxp, *omp, *os, *osn;
  long pred;
  if (!PyArg_ParseTuple(args, "OOOOOOl", &ox, &om, &oxp, &omp, &os, &osn, &pred)) return nullptr;
  at::Tensor x, m, xp, mp;
  OptTensor st, snt;
  double s, sn;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "denoised", &m) || !tensor_arg(oxp, "x_proposal", &xp) ||
      !tensor_arg(omp, "denoised_proposal", &mp))
    return nullptr;
  for (const Arg a : {level_arg(os, "sigma", &st, &s), level_arg(osn, "sigma_next", &snt, &sn)}) {
    if (a == Arg::kError) return nullptr;
    if (a == Arg::kReference) return not_implemented();
  }
  return guarded([&] {
    static auto op = op_handle("diffkern::heun_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptTensor&, const OptTensor&, double, double, int64_t)>();
    level_dtype(st);
    level_dtype(snt);
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, m, xp, mp, st, snt, s, sn, pred);
    }
    return wrap(std::move(out));
  });
}

// _dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, prediction_type, solver_type,
//                variance_preserving, return_denoised)
PyObject* dpmpp_2m_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *oold, *os, *osn, *osp, *ovp, *oret;
  long pred, solver;
  if (!PyArg_ParseTuple(args, "OOOOOOllOO", &ox, &om, &oold, &os, &osn, &osp, &pred, &solver, &ovp, &oret))
    return nullptr;
  at::Tensor x, m;
  OptTensor old, st, snt, spt;
  double s, sn, sp = 0.0;
  bool vp, ret;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "denoised", &m) || !opt_tensor_arg(oold, "old_denoised", &old) ||
      !bool_arg(ovp, "variance_preserving", &vp) || !bool_arg(oret, "return_denoised", &ret))
    return nullptr;
  for (const Arg a : {level_arg(os, "sigma", &st, &s), level_arg(osn, "sigma_next", &snt, &sn),
                      osp == Py_None ? Arg::kOk : level_arg(osp, "sigma_prev", &spt, &sp)}) {
    if (a == Arg::kError) return nullptr;
    if (a == Arg::kReference) return not_implemented();
  }
  return guarded([&] {
    static auto op = op_handle("diffkern::dpmpp_2m_step")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, double, double, double, int64_t, int64_t, bool,
                             bool)>();
    level_dtype(st);
    level_dtype(snt);
    level_dtype(spt);
    std::tuple<at::Tensor, at::Tensor> r;
    {
      pybind11::gil_scoped_release no_gil;
      r = op.call(x, m, old, st, snt, spt, s, sn, sp, pred, solver, vp, ret);
    }
    return one_or_pair(std::move(r), ret);
  });
}

// _flow_step(x, velocity, sigma, sigma_next, stochastic, noise, generator)
PyObject* flow_step(PyObject*, PyObject* args) {
  PyObject *ox, *ov, *os, *osn, *ost, *onoise, *ogen;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOO|OOL", &ox, &ov, &os, &osn, &ost, &onoise, &ogen, &oseeds, &ostep, &step))
    return nullptr;
  at::Tensor x, v;
  OptTensor st, snt, noise, seeds, step_t;
  double s, sn;
  bool stochastic;
  OptGen gen;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(ov, "velocity", &v) || !bool_arg(ost, "stochastic", &stochastic) ||
      !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  for (const Arg a : {level_arg(os, "sigma", &st, &s), level_arg(osn, "sigma_next", &snt, &sn)}) {
    if (a == Arg::kError) return nullptr;
    if (a == Arg::kReference) return not_implemented();
  }
  return guarded([&] {
    static auto op = op_handle("diffkern::flow_step")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                           double, double, bool, const OptTensor&, const OptGen&, int64_t, int64_t,
                                           const OptTensor&, const OptTensor&, int64_t)>();
    level_dtype(st);
    level_dtype(snt);
    const OptGen g = drawing_generator(gen, x, stochastic && !noise.has_value() && !seeds.has_value());
    at::Tensor out;
    {
      pybind11::gil_scoped_release no_gil;
      out = op.call(x, v, st, snt, s, sn, stochastic, noise, g, 0, 0, seeds, step_t, step);
    }
    return wrap(std::move(out));
  });
}

// _flow_q_sample(x0, sigma, noise, generator) -> (x_sigma, the noise given or drawn)
PyObject* flow_q_sample(PyObject*, PyObject* args) {
  PyObject *ox, *os, *onoise, *ogen;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOO|OOL", &ox, &os, &onoise, &ogen, &oseeds, &ostep, &step)) return nullptr;
  at::Tensor x;
  OptTensor st, noise, seeds, step_t;
  double s;
  OptGen gen;
  if (!tensor_arg(ox, "x0", &x) || !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !opt_tensor_arg(oseeds, "seeds", &seeds) || !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  const Arg a = level_arg(os, "sigma", &st, &s);
  if (a == Arg::kError) return nullptr;
  if (a == Arg::kReference) return not_implemented();
  return guarded([&]() -> PyObject* {
    static auto op = op_handle("diffkern::flow_q_sample")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, double,
                                                                   const OptTensor&, const OptGen&, int64_t, int64_t,
                                                                   const OptTensor&, const OptTensor&, int64_t)>();
    level_dtype(st);
    const OptGen g = drawing_generator(gen, x, !noise.has_value() && !seeds.has_value());
    std::tuple<at::Tensor, at::Tensor> r;
    {
      pybind11::gil_scoped_release no_gil;
      r = op.call(x, st, s, noise, g, 0, 0, seeds, step_t, step);
    }
    return noised_pair(std::move(r), noise.has_value() ? onoise : nullptr);
  });
}

// _lcm_step(x, model_output, t, t_prev, table, timestep_scaling, sigma_data, prediction_type, clip_sample, noise,
//           generator, return_denoised)
PyObject* lcm_step(PyObject*, PyObject* args) {
  PyObject *ox, *om, *ot, *otp, *otab, *onoise, *ogen, *oret;
  double ts, sd, clip;
  long pred;
  PyObject *oseeds = Py_None, *ostep = Py_None;
  long long step = 0;
  if (!PyArg_ParseTuple(args, "OOOOOddldOOO|OOL", &ox, &om, &ot, &otp, &otab, &ts, &sd, &pred, &clip, &onoise, &ogen,
                        &oret, &oseeds, &ostep, &step))
    return nullptr;
  at::Tensor x, m, t, tp, tab;
  OptTensor noise, seeds, step_t;
  OptGen gen;
  bool ret;
  if (!tensor_arg(ox, "x", &x) || !tensor_arg(om, "model_output", &m) || !tensor_arg(ot, "t", &t) ||
      !tensor_arg(otp, "t_prev", &tp) || !tensor_arg(otab, "alphas_cumprod", &tab) ||
      !opt_tensor_arg(onoise, "noise", &noise) || !generator_arg(ogen, &gen) ||
      !bool_arg(oret, "return_denoised", &ret) || !opt_tensor_arg(oseeds, "seeds", &seeds) ||
      !opt_tensor_arg(ostep, "step", &step_t))
    return nullptr;
  return guarded([&] {
    static auto op = op_handle("diffkern::lcm_step")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, double, int64_t, double, bool, const OptTensor&, const OptGen&,
                             int64_t, int64_t, bool, const OptTensor&, const OptTensor&, int64_t)>();
    // One draw per call, also on the final step (the reference's generator advances the
    // same way); a final step known on the host draws nothing.
    const bool renoise = !(tp.device().is_cpu() && tp.numel() == 1 && at::isIntegralType(tp.scalar_type(), false) &&
                           tp.item<int64_t>() < 0);
    const OptGen g = drawing_generator(gen, x, !noise.has_value() && !seeds.has_value());
    std::tuple<at::Tensor, at::Tensor> r;
    {
      pybind11::gil_scoped_release no_gil;
      r = op.call(x, m, t, tp, tab, ts, sd, pred, clip, renoise, noise, g, 0, 0, ret, seeds, step_t, step);
    }
    return one_or_pair(std::move(r), ret);
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
    {"_euler_step", euler_step, METH_VARARGS, "eager euler_step (see diffkern/sampler_ops.py)"},
    {"_heun_step", heun_step, METH_VARARGS, "eager heun_step (see diffkern/sampler_ops.py)"},
    {"_dpmpp_2m_step", dpmpp_2m_step, METH_VARARGS, "eager dpmpp_2m_step (see diffkern/sampler_ops.py)"},
    {"_flow_step", flow_step, METH_VARARGS, "eager flow_step (see diffkern/sampler_ops.py)"},
    {"_flow_q_sample", flow_q_sample, METH_VARARGS, "eager flow_q_sample (see diffkern/sampler_ops.py)"},
    {"_lcm_step", lcm_step, METH_VARARGS, "eager lcm_step (see diffkern/sampler_ops.py)"},
    {"_cpu_generator_key", cpu_key, METH_O, "(seed, offset) of the next draw from a CPU generator"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_call_methods() { return kMethods; }

}  // namespace diffkern
