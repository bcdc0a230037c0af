// CUDA binding helpers: device guard, current stream, dtype, operands and the Philox
// state taken from a torch CUDA generator. Translation only; no math.
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

// Tensors -> StepLaunch; allocates the output (and the noise output for q_sample).
struct StepTensors {
  at::Tensor out, noise_out;
  Operand x, m, noise;
  cuda::StepLaunch launch;
};

inline StepTensors prepare_step(const at::Tensor& x, const at::Tensor* m, const std::optional<at::Tensor>& noise,
                                bool draw, at::IntArrayRef levels, bool writes_noise) {
  TORCH_CHECK(x.is_cuda(), "expected CUDA tensors");
  StepTensors s;
  s.out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto& p = s.launch;
  p.dtype = dtype_of(x);
  p.numel = s.out.numel();
  p.levels = level_map(levels, x.sizes());
  p.device = x.get_device();
  s.x = make_operand(x, s.out.sizes());
  p.x = operand(s.x);
  bool vec = s.x.contiguous && aligned16(s.x.data) && aligned16(s.out.data_ptr());
  if (m) {
    check_same(x, *m, "model output");
    s.m = make_operand(*m, s.out.sizes());
    p.m = operand(s.m);
    p.has_m = true;
    vec = vec && s.m.contiguous && aligned16(s.m.data);
  }
  if (noise.has_value()) {
    check_same(x, *noise, "noise");
    s.noise = make_operand(*noise, s.out.sizes());
    p.noise = operand(s.noise);
    p.has_noise = true;
    vec = vec && s.noise.contiguous && aligned16(s.noise.data);
  }
  p.draw = draw && !p.has_noise;
  p.out = s.out.data_ptr();
  if (writes_noise && p.draw) {
    s.noise_out = at::empty_like(s.out);
    p.noise_out = s.noise_out.data_ptr();
  }
  p.vectorized = vec;
  return s;
}

}  // namespace cuda_binding
}  // namespace diffkern
