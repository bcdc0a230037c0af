// Binding helpers: tensors -> the framework-free structs of csrc/kernels. No math here.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../kernels/common.h"
#include "../kernels/philox.h"
#include "../kernels/ops.h"

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

inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

// seeds= / step= of a drawing op: per-sample keys the kernel draws with (KeyedArgs).
// `seeds` int64 (1,) or (B,) on x's device; `step_t` a one-element int64 tensor on x's
// device (on CUDA read in the kernel, so a captured graph replays its buffer), or absent
// and then `step`. Keys exclude a generator and given noise.
struct Keyed {
  KeyedArgs args;
  at::Tensor seeds, step;  // what args points into
  bool on() const { return args.seeds != nullptr; }
};

inline Keyed keyed_args(const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& step_t, int64_t step,
                        const at::Tensor& x, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Generator>& generator) {
  Keyed k;
  if (!seeds.has_value()) {
    TORCH_CHECK_VALUE(!step_t.has_value() && step == 0, "step= needs seeds=");
    return k;
  }
  TORCH_CHECK_VALUE(!generator.has_value(), "pass either seeds or generator, not both");
  TORCH_CHECK_VALUE(!noise.has_value(), "pass either seeds or noise, not both");
  const int64_t B = x.dim() > 0 ? x.size(0) : 1;
  const at::Tensor& s = *seeds;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "seeds must be an int64 tensor, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() <= 1 && (s.numel() == 1 || s.numel() == B), "seeds must be an int or a tensor of shape (",
                    B, ",) (one per sample), got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == x.device(), "seeds must be on x's device (", x.device(), "), got ", s.device());
  k.seeds = s.is_contiguous() ? s : s.contiguous();
  k.args.seeds = k.seeds.data_ptr<int64_t>();
  k.args.nseeds = k.seeds.numel();
  k.args.inner = B > 0 && x.numel() > 0 ? x.numel() / B : 1;
  if (step_t.has_value()) {
    TORCH_CHECK_TYPE(step_t->scalar_type() == at::kLong && step_t->numel() == 1,
                     "step must be an int or a 0-d int64 tensor, got ", step_t->scalar_type(), " of shape ",
                     step_t->sizes());
    if (step_t->device().is_cpu()) {
      step = step_t->item<int64_t>();
    } else {
      TORCH_CHECK_VALUE(step_t->device() == x.device(), "step must be on the CPU or on x's device (", x.device(),
                        "), got ", step_t->device());
      k.step = step_t->contiguous();
      k.args.step_ptr = k.step.data_ptr<int64_t>();
      return k;
    }
  }
  TORCH_CHECK_VALUE(step >= 0 && step < (int64_t(1) << 62), "step must be in [0, 2**62), got ", step);
  k.args.step = uint64_t(step);
  return k;
}

}  // namespace diffkern
