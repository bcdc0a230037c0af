// Binding helpers of the sampler-family ops (their levels: levels.h).
// Translation only; the math is csrc/kernels/sampler_ops.h.
#pragma once
#include "../kernels/sampler_ops.h"
#include "common.h"
#include "levels.h"

namespace diffkern {

}  // namespace diffkern

namespace diffkern {

// linear_step's coefficients -> LinearOp: `coeffs` (outputs rows of inputs + 1 numbers,
// the noise coefficient last) shared by the batch, or when `table` is given a contiguous
// float64 tensor (1 or B, outputs * (inputs + 1)) on x's device, read per sample.
inline LinearOp linear_op(int64_t nin, int64_t nout, c10::ArrayRef<double> coeffs,
                          const std::optional<at::Tensor>& table, const at::Tensor& x) {
  TORCH_CHECK(nin >= 1 && nin <= kMaxLinearInputs, "linear_step takes 1 to ", kMaxLinearInputs, " inputs, got ", nin);
  TORCH_CHECK(nout >= 1 && nout <= kMaxLinearOutputs, "linear_step has 1 to ", kMaxLinearOutputs, " outputs, got ",
              nout);
  LinearOp op;
  op.nin = int(nin);
  op.nout = int(nout);
  const int64_t w = nout * (nin + 1);
  if (table.has_value()) {
    const at::Tensor& t = *table;
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kDouble && t.size(1) == w,
                "linear_step's coefficient table must be a contiguous float64 (rows, ", w, ") tensor");
    TORCH_CHECK(t.size(0) == 1 || t.size(0) == batch_of(x), "the coefficient table has ", t.size(0),
                " rows but x has batch size ", batch_of(x));
    TORCH_CHECK(t.device() == x.device(), "the coefficient table must be on x's device");
    op.table = t.data_ptr<double>();
    op.rows = t.size(0);
  } else {
    TORCH_CHECK(int64_t(coeffs.size()) == w, "linear_step expects ", w, " coefficients, got ", coeffs.size());
    for (int64_t i = 0; i < w; ++i) op.shared[i] = coeffs[i];
  }
  return op;
}

}  // namespace diffkern
