// CUDA binding helpers of the sampler-family ops: tensors -> SamplerLaunch. Translation only.
#pragma once
#include "../sampler_args.h"
#include "common.h"
#include "../validate.h"

namespace diffkern {
namespace cuda_binding {

struct SamplerTensors {
  at::Tensor out, out1, out2;
  Operand in[kMaxLinearInputs], noise;
  cuda::SamplerLaunch launch;
};

// inputs[0] is x; a null ends the list. `levels`: the common shape of the level arrays. `nout`: the op's outputs to allocate (1 to 3; for
// noise-writing ops 2 when the noise is drawn). `dtype`: the outputs' and the kernel's
// (Undefined: x's); operands of another dtype are cast to it here (the kernels load one).
inline SamplerTensors prepare_outputs(c10::ArrayRef<const at::Tensor*> inputs, const std::optional<at::Tensor>& noise,
                                      bool draw, at::IntArrayRef levels, int nout,
                                      at::ScalarType dtype = at::ScalarType::Undefined) {
  static const char* const kNames[kMaxLinearInputs] = {"x", "model output", "third input", "fourth input",
                                                       "fifth input", "sixth input"};
  const at::Tensor& x = *inputs[0];
  TORCH_CHECK(x.is_cuda(), "expected CUDA tensors");
  if (dtype == at::ScalarType::Undefined) dtype = x.scalar_type();
  SamplerTensors s;
  s.out = at::empty(x.sizes(), x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  auto& p = s.launch;
  p.dtype = dtype_of(s.out);
  p.numel = s.out.numel();
  p.levels = level_map(levels, x.sizes());
  p.device = x.get_device();
  bool vec = aligned16(s.out.data_ptr());
  int nin = 0;
  for (const at::Tensor* t : inputs) {
    if (!t) break;
    TORCH_CHECK(nin < kMaxLinearInputs, "diffkern: too many inputs");
    TORCH_CHECK(t->device() == x.device(), kNames[nin], " must be on x's device");
    s.in[nin] = make_operand(t->scalar_type() == dtype ? *t : t->to(dtype), s.out.sizes());
    p.in[nin] = operand(s.in[nin]);
    vec = vec && s.in[nin].contiguous && aligned16(s.in[nin].data);
    ++nin;
  }
  p.nin = nin;
  if (noise.has_value()) {
    TORCH_CHECK(noise->device() == x.device(), "noise must be on x's device");
    s.noise = make_operand(noise->scalar_type() == dtype ? *noise : noise->to(dtype), s.out.sizes());
    p.noise = operand(s.noise);
    p.has_noise = true;
    vec = vec && s.noise.contiguous && aligned16(s.noise.data);
  }
  p.draw = draw && !p.has_noise;
  p.out[0] = s.out.data_ptr();
  at::Tensor* extra[2] = {&s.out1, &s.out2};
  for (int j = 1; j < nout && j < kMaxLinearOutputs; ++j) {
    *extra[j - 1] = at::empty_like(s.out);
    p.out[j] = extra[j - 1]->data_ptr();
    vec = vec && aligned16(p.out[j]);
  }
  p.vectorized = vec;
  return s;
}

// The fixed-arity ops. `second`: allocate the second output (the op's second value; for
// noise-writing ops pass whether the noise is drawn).
inline SamplerTensors prepare_sampler(std::initializer_list<const at::Tensor*> inputs,
                                      const std::optional<at::Tensor>& noise, bool draw, at::IntArrayRef levels,
                                      bool second, at::ScalarType dtype = at::ScalarType::Undefined) {
  return prepare_outputs(c10::ArrayRef<const at::Tensor*>(inputs.begin(), inputs.size()), noise, draw, levels,
                         second ? 2 : 1, dtype);
}

// An output in x's memory format: the kernel writes in x's logical order, and a
// channels_last x gets channels_last outputs, as from the front-door ops.
inline at::Tensor in_x_format(const at::Tensor& out, const at::Tensor& x) {
  return validate::in_format(out, validate::output_format(x));
}

}  // namespace cuda_binding
}  // namespace diffkern
