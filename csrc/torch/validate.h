// The one validation layer of the ops: every caller (the public Python functions, a raw
// torch.ops.diffkern.* call, torch.compile's runtime, opcheck) reaches these checks in the
// backend kernels before anything is allocated. TORCH_CHECK_TYPE raises TypeError and
// TORCH_CHECK_VALUE ValueError in Python; every message names the argument.
//
// What is checked where:
// - tensors' dtype, device and shape: always (metadata only, no data read);
// - the values of t / t_prev (range, t_prev < t) and the zero-terminal-SNR rule: when they
//   are on the CPU, where reading them costs nothing. A t on the GPU is never read back
//   (that would wait for the stream and break graph capture): there the kernels turn a
//   bad entry into NaN output for that sample (csrc/kernels/schedule.h, ddim.h, ddpm.h);
// - scalars (eta, step sizes, enums): always.
//
// Mixed floating dtypes promote as torch does (an fp16 model output with fp32 latents
// gives fp32). Nothing is cast here: the drivers read each operand in its own dtype and
// write the promoted one (cpu/driver.h, kernels/elementwise.cuh).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace diffkern {
namespace validate {

const char* const kModelOutput = "model_output (eps)";
const char* const kScore = "score";

// Floating point (fp16/bf16/fp32/fp64), else TypeError.
void floating(const at::Tensor& x, const char* name);

// `other` beside x: on x's device (ValueError), floating (TypeError), shape broadcasting to
// x's (ValueError).
void like(const at::Tensor& x, const at::Tensor& other, const char* name);

// Non-negative and finite (NaN and inf rejected), else ValueError.
void nonneg(double v, const char* name);
void positive(double v, const char* name);

void prediction_type(int64_t p);
void variance(int64_t v);
void noise_or_generator(const std::optional<at::Tensor>& noise, const std::optional<at::Generator>& generator);
void generator_device(const std::optional<at::Generator>& generator, const at::Tensor& x);

// The dtype of the result and the memory format of outputs (channels_last stays
// channels_last; everything else is contiguous). ops.py's fake kernels compute the same.
at::ScalarType result_type(const at::Tensor& x, const at::Tensor* m, const std::optional<at::Tensor>& noise);
at::MemoryFormat output_format(const at::Tensor& x);

// x's batch size (1 for a 0-d x): the length a per-sample t may have.
inline int64_t batch(const at::Tensor& x) { return x.dim() > 0 ? x.size(0) : 1; }

// The timesteps of a step, checked and made what the kernels take: contiguous int64 arrays
// of the common level shape of t and t_prev (levels.h: per sample, per frame, per token,
// ...), on x's device.
struct Timesteps {
  at::Tensor t;
  std::optional<at::Tensor> t_prev;
};
// `prediction` >= 0: epsilon prediction is refused where alphas_cumprod[t] == 0 (a zero
// terminal SNR), when t and the table can be read on the host. -1: no such rule (q_sample).
Timesteps timesteps(const at::Tensor& x, const at::Tensor& table, const at::Tensor& t,
                    const std::optional<at::Tensor>& t_prev, int64_t prediction);

void table(const at::Tensor& table, const at::Tensor& x);

// A tensor in `dtype`, copied only where it differs (the backward kernels read one dtype).
at::Tensor cast(const at::Tensor& v, at::ScalarType dtype);
std::optional<at::Tensor> cast(const std::optional<at::Tensor>& v, at::ScalarType dtype);

// The contiguous result of a kernel in the memory format the op promises.
at::Tensor in_format(at::Tensor out, at::MemoryFormat format);

// Everything an elementwise step's kernel needs, checked: x / m / noise in their own
// dtypes (noise only when the op uses it) and the result dtype, timesteps normalized
// (absent for langevin_step), the output's memory format, and whether there is nothing to
// compute.
struct Step {
  at::Tensor x, m;
  std::optional<at::Tensor> noise;  // given and used
  Timesteps ts;
  at::ScalarType dtype;
  at::MemoryFormat format;
  bool empty;
};
// `m` null: no model output (q_sample). `t` null: no timesteps (langevin_step).
Step step(const at::Tensor& x, const char* x_name, const at::Tensor* m, const char* m_name,
          const std::optional<at::Tensor>& noise, bool noise_used, const std::optional<at::Generator>& generator,
          const at::Tensor* table, const at::Tensor* t, const std::optional<at::Tensor>* t_prev, int64_t prediction);

// step_backward's inputs: grad of the forward output's shape (any floating dtype), x and
// the model output as in the forward (here cast to the result dtype), the forward's
// scalars.
Step backward_step(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& m, const at::Tensor& table,
                   const at::Tensor& t, const std::optional<at::Tensor>& t_prev, int64_t kind, double eta,
                   int64_t variance, int64_t prediction);

// The output of a step with nothing to compute (zero elements).
at::Tensor empty_result(const Step& s, const at::Tensor& x);

// The tensor operands of a sampler-family op, checked, and the result dtype (the
// promotion of every input's dtype and of the noise's where the step uses it). They stay
// in their own dtypes: both drivers load each in its own. inputs[0] is x
// (floating), the others model outputs, proposals or history beside it (on x's device,
// floating, broadcasting to x's shape); a null input is an absent optional one and stays
// null. The generator, when given, excludes noise and must suit x's device.
struct Operands {
  static constexpr int kMax = 6;
  at::Tensor in[kMax];
  int n = 0;
  std::optional<at::Tensor> noise;  // given and used
  at::ScalarType dtype;              // of the result
  const at::Tensor* input(int i) const { return i < n && in[i].defined() ? &in[i] : nullptr; }
};
using NamedInput = std::pair<const at::Tensor*, const char*>;
Operands operands(c10::ArrayRef<NamedInput> inputs, const std::optional<at::Tensor>& noise, bool noise_used,
                  const std::optional<at::Generator>& generator);
inline Operands operands(std::initializer_list<NamedInput> inputs, const std::optional<at::Tensor>& noise,
                         bool noise_used, const std::optional<at::Generator>& generator) {
  return operands(c10::ArrayRef<NamedInput>(inputs.begin(), inputs.size()), noise, noise_used, generator);
}

// A bool option's code (0/1) or an enum's range, named as the Python face names it.
void solver_type(int64_t s);

// gmm_annealed_langevin's mixture, sigmas and counts (the fused kernels' limits aside).
void mixture(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& means, const at::Tensor& stds,
             const at::Tensor& sigmas, int64_t n_steps_each, double step_lr);

}  // namespace validate
}  // namespace diffkern
