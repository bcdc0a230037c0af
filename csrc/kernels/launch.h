// Launchers of the CUDA kernels: plain structs and raw pointers, no framework types, so
// the bindings (csrc/torch/cuda) translate tensors into these and nothing more.
#pragma once
#include <cuda_runtime_api.h>

#include "common.h"
#include "philox.h"
#include "ops.h"

namespace diffkern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Where the Philox key comes from. Under CUDA-graph capture torch hands out pointers to
// its seed/offset in device memory plus an offset within the graph, read at run time, so
// every replay draws fresh noise (torch's own fused ops do the same).
struct RngArgs {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

using Operand = OperandView;

// Every elementwise op (the op_base.h interface; the older step ops through
// SampleStep): up to six inputs (in[0] = x; a fixed-arity op's last may be absent, nin =
// kInputs - 1; LinearOp reads nin of them), optional noise, one to three outputs (out[j]
// null: not written; a kWritesNoise op's out[1] gets the drawn noise).
struct SamplerLaunch {
  DType dtype = DType::kFloat32;  // of the outputs and the computation (the promoted one)
  int64_t numel = 0;
  LevelMap levels;  // where each element's levels sit (common.h)
  Operand in[kMaxLinearInputs];
  int nin = 1;
  Operand noise;
  // Some operand is stored in another dtype than `dtype`: each is then read in its own,
  // in_dtype[j] / noise_dtype (elementwise.cuh's load_unit).
  bool mixed = false;
  DType in_dtype[kMaxLinearInputs] = {};
  DType noise_dtype = DType::kFloat32;
  bool has_noise = false, draw = false;
  bool vectorized = false;  // every operand contiguous and 16-byte aligned
  void* out[kMaxLinearOutputs] = {nullptr, nullptr, nullptr};
  RngArgs rng;
  KeyedArgs keyed;  // seeds set: draws keyed per sample instead of from `rng`
  int device = 0;
};

void launch_q_sample(const SamplerLaunch& p, const QSampleOp& op, cudaStream_t stream);
void launch_ddim_step(const SamplerLaunch& p, const DdimOp& op, cudaStream_t stream);
void launch_ddpm_step(const SamplerLaunch& p, const DdpmOp& op, cudaStream_t stream);
void launch_langevin_step(const SamplerLaunch& p, const LangevinOp& op, cudaStream_t stream);
void launch_euler_step(const SamplerLaunch& p, const EulerOp& op, cudaStream_t stream);
void launch_heun_step(const SamplerLaunch& p, const HeunOp& op, cudaStream_t stream);
void launch_dpmpp_2m_step(const SamplerLaunch& p, const DpmppOp& op, cudaStream_t stream);
void launch_flow_step(const SamplerLaunch& p, const FlowOp& op, cudaStream_t stream);
void launch_flow_q_sample(const SamplerLaunch& p, const FlowQSampleOp& op, cudaStream_t stream);
void launch_lcm_step(const SamplerLaunch& p, const LcmOp& op, cudaStream_t stream);
void launch_lcm_step_backward(const SamplerLaunch& p, const LcmBackwardOp& op, cudaStream_t stream);
void launch_linear_step(const SamplerLaunch& p, const LinearOp& op, cudaStream_t stream);

struct BackwardLaunch {
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  LevelMap levels;
  Operand grad, x, m;
  void* grad_x = nullptr;
  void* grad_m = nullptr;
  void* grad_noise = nullptr;  // null: not requested
  int device = 0;
};

void launch_step_backward(const BackwardLaunch& p, int kind, const DdimOp& ddim, const DdpmOp& ddpm,
                          cudaStream_t stream);

struct GmmLaunch {
  bool is_double = false;
  void* x = nullptr;  // (npoints, D) contiguous, updated in place
  int64_t npoints = 0;
  int D = 0, K = 0;
  const void* weights = nullptr;  // (K,) x's dtype
  const void* means = nullptr;    // (K, D)
  const void* stds = nullptr;     // (K, D)
  const double* sigmas = nullptr; // (L,) on the device
  int L = 0;
  int64_t n_steps_each = 0;
  double step_lr = 0, sigma_last = 1;
  bool denoise = false;
  RngArgs rng;
  int device = 0;
};

void launch_gmm_annealed_langevin(const GmmLaunch& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
