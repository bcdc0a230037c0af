// The emulation library's one export (emu_api.h).
#include "cuda_emu.h"

#include "emu_api.h"

extern "C" const dk_emu::Kernels* dk_emu_kernels() {
  using namespace diffkern::cuda;
  static const dk_emu::Kernels k{
#if defined(DIFFKERN_EMU_DEVICE_BRANCH)
      true,
#else
      false,
#endif
      dk_emu::set_sm_count, dk_emu::threads_executed,
      launch_q_sample, launch_ddim_step, launch_ddpm_step, launch_langevin_step,
      launch_euler_step, launch_heun_step, launch_dpmpp_2m_step, launch_flow_step,
      launch_flow_q_sample, launch_lcm_step, launch_lcm_step_backward, launch_step_backward,
      launch_keyed_normal, launch_gmm_annealed_langevin, launch_linear_step};
  return &k;
}
