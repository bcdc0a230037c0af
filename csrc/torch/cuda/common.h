// CUDA binding helpers: device guard, current stream, dtype, operands and the Philox
// state taken from a torch CUDA generator, tensors -> SamplerLaunch. Translation only; no
// math.
#pragma once
#include "../levels.h"
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>

#include "../../kernels/launch.h"
#include "../common.h"
#include "../cpu_generator.h"
#include "../sampler_args.h"
#include "../validate.h"

namespace diffkern {
namespace cuda_binding {

inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "diffkern: unsupported dtype ", t.scalar_type());
  }
}

inline cuda::Operand operand(const Operand& o) { return static_cast<const OperandView&>(o); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Reserve `increment` Philox offsets of the generator (torch's default one for the
// device when none is given). Graph-safe: under capture the state is read on the device.
// A CPU generator drives CUDA noise through the CPU keying (cpu_generator.h), the same
// keys as on the CPU; with no generator the (seed, offset) passed in are the key.
inline cuda::RngArgs rng_from(const std::optional<at::Generator>& generator, int64_t seed, int64_t offset,
                              uint64_t increment = 4) {
  cuda::RngArgs r;
  if (!generator.has_value() || !generator->defined() || generator->device().is_cpu()) {
    const PhiloxKey k = draw_key(generator, seed, offset, true);
    r.seed = k.seed;
    r.offset = k.offset;
    return r;
  }
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(increment);
  }
  r.captured = st.captured_;
  if (st.captured_) {
    r.seed_ptr = st.seed_.ptr;
    r.offset_ptr = st.offset_.ptr;
    r.offset_intragraph = st.offset_intragraph_;
  } else {
    r.seed = st.seed_.val;
    r.offset = st.offset_.val;
  }
  return r;
}

// torch's convention (C10_CUDA_KERNEL_LAUNCH_CHECK) right after a launch of ours, and
// only then: a call that launched nothing (zero elements) returns before, so it cannot
// report someone else's pending error as its own.
#define DIFFKERN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

struct SamplerTensors {
  at::Tensor out, out1, out2;
  Operand in[kMaxLinearInputs], noise;
  cuda::SamplerLaunch launch;
};

// Tensors -> SamplerLaunch, for every elementwise op. inputs[0] is x; a null ends the list.
// `levels`: the common shape of the level arrays. `nout`: the op's outputs to allocate (1
// to 3; for noise-writing ops 2 when the noise is drawn). `dtype`: the outputs' and the
// kernel's (Undefined: x's); an operand of another dtype is read by the kernel in its own
// (no cast here).
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
    s.in[nin] = make_operand(*t, s.out.sizes());
    p.in[nin] = operand(s.in[nin]);
    p.in_dtype[nin] = dtype_of(*t);
    p.mixed = p.mixed || t->scalar_type() != dtype;
    vec = vec && s.in[nin].contiguous && aligned16(s.in[nin].data);
    ++nin;
  }
  p.nin = nin;
  if (noise.has_value()) {
    TORCH_CHECK(noise->device() == x.device(), "noise must be on x's device");
    s.noise = make_operand(*noise, s.out.sizes());
    p.noise = operand(s.noise);
    p.noise_dtype = dtype_of(*noise);
    p.mixed = p.mixed || noise->scalar_type() != dtype;
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
