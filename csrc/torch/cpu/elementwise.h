// The CPU driver's tensor side: tensors -> StepIO (driver.h), dtype dispatch, outputs.
#pragma once
#include <array>
#include <optional>

#include "../common.h"
#include "../levels.h"
#include "../validate.h"
#include "driver.h"
#include "output_cache.h"

namespace diffkern {
namespace cpu {

// Tensors -> StepIO, dtype dispatch, run: inputs[0] is x (viewed with x's shape; a null
// ends the list), `noise` used when given, else drawn when `draw`. `dtype`: the outputs'
// and the loop's (Undefined: x's); an operand of another dtype is loaded in its own by
// the driver when the loop runs contiguous, else cast here.
// `levels`: the common shape of the op's level arrays (levels.h; all ones or empty when
// every level is a number). Returns the op's first `nout` outputs (for kWritesNoise ops
// the second is the drawn noise, allocated only when drawn); the others undefined.
// How the driver loads an operand of dtype `s` in a loop of `dtype`.
inline Storage storage_of(at::ScalarType s, at::ScalarType dtype) {
  if (s == dtype) return Storage::kSame;
  switch (s) {
    case at::kHalf: return Storage::kHalf;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kFloat: return Storage::kFloat;
    case at::kDouble: return Storage::kDouble;
    default: TORCH_CHECK(false, "diffkern: an operand of dtype ", s, " in a ", dtype, " step");
  }
}

template <class Op>
std::array<at::Tensor, kMaxOut> run_outputs(const Op& op, c10::ArrayRef<const at::Tensor*> inputs,
                                            const std::optional<at::Tensor>& noise, bool draw, PhiloxKey key,
                                            at::IntArrayRef levels, int nout, const KeyedArgs& keyed = {},
                                            at::ScalarType dtype = at::ScalarType::Undefined) {
  static const char* const kNames[kMaxIn] = {"x", "model output", "third input", "fourth input", "fifth input",
                                             "sixth input"};
  const at::Tensor& x = *inputs[0];
  TORCH_CHECK(x.device().is_cpu(), "expected CPU tensors");
  std::array<at::Tensor, kMaxOut> outs;
  // A channels_last(_3d) x with no noise to draw runs in memory order: over the permuted
  // (N, H, W, C) views the operands in x's layout are dense and the loop takes its
  // contiguous path (through the strided one a 16x4x64x64 float32 Euler step took 18x the
  // contiguous step's time), and the output needs no copy into x's layout. The batch stays
  // the outer dimension, so per-sample coefficients index as before. Drawn noise keeps
  // the logical order: its Philox counter is the logical index, so the numbers do not
  // depend on the layout. There the operands are copied to contiguous first: a copy pass
  // each costs far less than the strided loop (Euler ancestral: 10x the contiguous step).
  const at::MemoryFormat format = validate::output_format(x);
  const bool memory_order = format != at::MemoryFormat::Contiguous && !(draw && !noise.has_value());
  const bool five = x.dim() == 5;
  const std::array<int64_t, 5> perm = five ? std::array<int64_t, 5>{0, 2, 3, 4, 1}
                                           : std::array<int64_t, 5>{0, 2, 3, 1, 0};
  const std::array<int64_t, 5> inverse = five ? std::array<int64_t, 5>{0, 4, 1, 2, 3}
                                              : std::array<int64_t, 5>{0, 3, 1, 2, 0};
  const at::IntArrayRef perm_ref(perm.data(), five ? 5 : 4), inverse_ref(inverse.data(), five ? 5 : 4);
  const bool copy_in = format != at::MemoryFormat::Contiguous && !memory_order;
  auto ordered = [&](const at::Tensor& t) {
    if (memory_order) return t.expand(x.sizes()).permute(perm_ref);
    return copy_in && !t.is_contiguous() ? t.expand(x.sizes()).contiguous() : t;
  };
  if (dtype == at::ScalarType::Undefined) dtype = x.scalar_type();
  outs[0] = empty_output(ordered(x).sizes(), x.options().dtype(dtype));
  const int64_t numel = outs[0].numel();
  const LevelMap lmap = level_map(levels, x.sizes(), memory_order ? perm_ref : at::IntArrayRef());
  StepIO io;
  // The operands' tensors (a copy made for the loop among them) outlive the loop here:
  // StepIO holds only their views.
  Operand owners[kMaxIn + 1];
  Storage storage[kMaxIn + 1] = {};
  const at::Tensor* sources[kMaxIn + 1] = {};
  for (const at::Tensor* t : inputs) {
    if (!t) break;  // an absent last input
    TORCH_CHECK(io.nin < Op::kInputs, "diffkern: too many inputs");
    TORCH_CHECK(t->device() == x.device(), kNames[io.nin], " must be on x's device");
    sources[io.nin] = t;
    owners[io.nin] = make_operand(ordered(*t), outs[0].sizes());
    storage[io.nin] = storage_of(t->scalar_type(), dtype);
    ++io.nin;
  }
  if (noise.has_value()) {
    TORCH_CHECK(noise->device() == x.device(), "noise must be on x's device");
    sources[kMaxIn] = &*noise;
    owners[kMaxIn] = make_operand(ordered(*noise), outs[0].sizes());
    storage[kMaxIn] = storage_of(noise->scalar_type(), dtype);
    io.has_noise = true;
  }
  // The driver loads other dtypes only in its contiguous loop (and into float/double):
  // elsewhere such operands are cast to `dtype` first.
  bool contiguous = !io.has_noise || owners[kMaxIn].contiguous;
  for (int j = 0; j < io.nin; ++j) contiguous = contiguous && owners[j].contiguous;
  const bool wide = dtype == at::kFloat || dtype == at::kDouble;
  for (int j = 0; j <= kMaxIn; ++j) {
    if (!sources[j] || storage[j] == Storage::kSame) continue;
    if (!contiguous || !wide || (storage[j] == Storage::kDouble && dtype != at::kDouble)) {
      owners[j] = make_operand(ordered(sources[j]->to(dtype)), outs[0].sizes());
      storage[j] = Storage::kSame;
    }
  }
  for (int j = 0; j < io.nin; ++j) {
    io.in[j] = owners[j];
    io.in_storage[j] = storage[j];
  }
  if (io.has_noise) {
    io.noise = owners[kMaxIn];
    io.noise_storage = storage[kMaxIn];
  }
  io.draw = draw && !io.has_noise;
  io.key = key;
  io.keyed = keyed;
  const int n = Op::kWritesNoise ? (io.draw ? 2 : 1) : std::min(std::max(nout, 1), Op::kOutputs);
  for (int j = 0; j < n; ++j) {
    if (j > 0) outs[j] = empty_output(outs[0].sizes(), outs[0].options());
    io.out[j] = outs[j].data_ptr();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffkern_cpu_step", [&] {
    run_elementwise<scalar_t>(op, io, numel, lmap);
  });
  // A channels_last x gets channels_last outputs, as from the front-door ops
  // (validate::output_format): the memory-order outputs viewed back in x's dimension
  // order, the logical-order ones copied.
  for (auto& t : outs)
    if (t.defined()) t = memory_order ? t.permute(inverse_ref) : validate::in_format(t, format);
  return outs;
}

// The fixed-arity ops: the output and the second output (the op's second value when
// `second`, or for kWritesNoise ops the drawn noise; undefined otherwise).
template <class Op>
std::pair<at::Tensor, at::Tensor> run_sampler(const Op& op, std::initializer_list<const at::Tensor*> inputs,
                                              const std::optional<at::Tensor>& noise, bool draw, PhiloxKey key,
                                              at::IntArrayRef levels, bool second, const KeyedArgs& keyed = {},
                                              at::ScalarType dtype = at::ScalarType::Undefined) {
  auto outs = run_outputs(op, c10::ArrayRef<const at::Tensor*>(inputs.begin(), inputs.size()), noise, draw, key,
                          levels, second ? 2 : 1, keyed, dtype);
  return {outs[0], outs[1]};
}

// The older ops: `noise_out` is written when the op draws and reports its noise (q_sample).
template <class Op>
at::Tensor run_step(const Op& op, const at::Tensor& x, const at::Tensor* m, const std::optional<at::Tensor>& noise,
                    bool draw, PhiloxKey key, at::IntArrayRef levels, at::ScalarType dtype,
                    at::Tensor* noise_out = nullptr, const KeyedArgs& keyed = {}) {
  auto [out, out1] = run_sampler(SampleStep<Op>{op}, {&x, m}, noise, draw, key, levels, false, keyed, dtype);
  if (noise_out && out1.defined()) *noise_out = out1;
  return out;
}

}  // namespace cpu
}  // namespace diffkern
