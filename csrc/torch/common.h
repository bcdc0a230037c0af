// Binding helpers: tensors -> the framework-free structs of csrc/kernels. No math here.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../kernels/common.h"
#include "../kernels/philox.h"
#include "../kernels/step_ops.h"

namespace diffkern {

// An input viewed with the output's shape: contiguous, or strided with an indexer; the
// drivers read it as the OperandView it is.
struct Operand : OperandView {
  at::Tensor owner;  // keeps a contiguous copy alive when one was needed
};

inline Operand make_operand(const at::Tensor& t, at::IntArrayRef shape) {
  Operand op;
  at::Tensor v = t.expand(shape);
  if (v.is_contiguous()) {
    op.owner = v;
    op.data = v.data_ptr();
    return op;
  }
  if (v.dim() > kMaxDims) {  // rare: more dims than the indexer holds, so copy
    op.owner = v.contiguous();
    op.data = op.owner.data_ptr();
    return op;
  }
  op.owner = v;
  op.data = v.data_ptr();
  op.contiguous = false;
  op.ix.ndim = static_cast<int>(v.dim());
  for (int d = 0; d < v.dim(); ++d) {
    op.ix.sizes[d] = v.size(d);
    op.ix.strides[d] = v.stride(d);
  }
  return op;
}

inline int64_t batch_of(const at::Tensor& out) { return out.dim() > 0 ? out.size(0) : 1; }

inline TimestepArgs timestep_args(const at::Tensor& table, const at::Tensor& t,
                                  const std::optional<at::Tensor>& t_prev) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous(), "alphas_cumprod must be contiguous float32");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), "t must be a contiguous int64 tensor");
  TORCH_CHECK(t.device() == table.device(), "t and alphas_cumprod must share a device");
  const int64_t* tp = nullptr;
  if (t_prev.has_value()) {
    TORCH_CHECK(t_prev->scalar_type() == at::kLong && t_prev->is_contiguous() && t_prev->numel() == t.numel(),
                "t_prev must be a contiguous int64 tensor of t's size");
    TORCH_CHECK(t_prev->device() == table.device(), "t_prev and alphas_cumprod must share a device");
    tp = t_prev->data_ptr<int64_t>();
  }
  return TimestepArgs{table.data_ptr<float>(), table.numel(), t.data_ptr<int64_t>(), tp, t.numel()};
}

inline void check_same(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == x.device(), name, " must be on x's device");
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), name, " must have x's dtype");
}

inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

}  // namespace diffkern
