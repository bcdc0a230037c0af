// Binding helpers of the sampler-family ops: their scalar arguments -> SampleScalar.
// Translation only; the math is csrc/kernels/sampler_ops.h.
#pragma once
#include "../kernels/sampler_ops.h"
#include "common.h"

namespace diffkern {

// A scalar passed as a number (`value`) or, when `per_sample` is given, as a contiguous
// 1-D float32/float64 tensor of length 1 or B on x's device (read inside the kernel).
inline SampleScalar sample_scalar(const std::optional<at::Tensor>& per_sample, double value, const at::Tensor& x,
                                  const char* name) {
  SampleScalar s;
  s.value = value;
  if (!per_sample.has_value()) return s;
  const at::Tensor& t = *per_sample;
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              name, " must be a contiguous 1-D float32/float64 tensor");
  TORCH_CHECK(t.numel() == 1 || t.numel() == batch_of(x), name, " has ", t.numel(), " entries but x has batch size ",
              batch_of(x));
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device");
  s.data = t.data_ptr();
  s.n = t.numel();
  s.is_double = t.scalar_type() == at::kDouble;
  return s;
}

}  // namespace diffkern
