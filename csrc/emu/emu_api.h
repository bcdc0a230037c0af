// What the emulation library (libdiffkern_cuda_emu*.so) exports: one C symbol returning
// a table of the kernels' launchers. Everything else in the library is local (exports.map):
// with the inline functions of the kernel headers exported, the dynamic linker would bind
// the library's calls to the test's own copies (the test includes the same headers for
// its oracle), and a bug in the library's copy, such as one in a __CUDA_ARCH__ branch,
// would never run. Two builds of the library (host and device branches) are loaded side
// by side with dlopen, each under its own handle.
#pragma once
#include "kernels/keyed.h"
#include "kernels/launch.h"

namespace dk_emu {

struct Kernels {
  bool device_branch;
  void (*set_sm_count)(int device, int sms);
  long long (*threads_executed)();
  void (*q_sample)(const diffkern::cuda::SamplerLaunch&, const diffkern::QSampleOp&, cudaStream_t);
  void (*ddim_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::DdimOp&, cudaStream_t);
  void (*ddpm_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::DdpmOp&, cudaStream_t);
  void (*langevin_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::LangevinOp&, cudaStream_t);
  void (*euler_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::EulerOp&, cudaStream_t);
  void (*heun_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::HeunOp&, cudaStream_t);
  void (*dpmpp_2m_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::DpmppOp&, cudaStream_t);
  void (*flow_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::FlowOp&, cudaStream_t);
  void (*flow_q_sample)(const diffkern::cuda::SamplerLaunch&, const diffkern::FlowQSampleOp&, cudaStream_t);
  void (*lcm_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::LcmOp&, cudaStream_t);
  void (*lcm_step_backward)(const diffkern::cuda::SamplerLaunch&, const diffkern::LcmBackwardOp&, cudaStream_t);
  void (*step_backward)(const diffkern::cuda::BackwardLaunch&, int, const diffkern::DdimOp&, const diffkern::DdpmOp&,
                        cudaStream_t);
  void (*keyed_normal)(const diffkern::cuda::KeyedLaunch&, cudaStream_t);
  void (*gmm_annealed_langevin)(const diffkern::cuda::GmmLaunch&, cudaStream_t);
  void (*linear_step)(const diffkern::cuda::SamplerLaunch&, const diffkern::LinearOp&, cudaStream_t);
};

}  // namespace dk_emu

extern "C" __attribute__((visibility("default"))) const dk_emu::Kernels* dk_emu_kernels();
