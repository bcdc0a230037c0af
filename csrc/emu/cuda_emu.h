// Host emulation of the CUDA execution model, enough to run csrc/kernels on a CPU (issue 24):
// every block of a launch runs on the calling thread, its threads one after another; a
// block whose threads meet at __syncthreads runs as fibers (one ucontext per thread) that
// switch at each barrier. Included first by the emulation library (csrc/emu/kernels.cpp),
// before any CUDA header, so that the CUDA headers take __shared__ as defined here.
//
// DIFFKERN_EMU_DEVICE_BRANCH compiles the `#if defined(__CUDA_ARCH__)` branches of the
// kernel headers (__umulhi, __float_as_uint, device libm calls) against exact host
// versions, so a bug that lives only in a device branch shows up here too.
#pragma once

// Block-shared arrays become function statics: the blocks of a launch run one at a time.
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // nvcc declares the device libm (::sqrt, ::logf, ...) implicitly

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __noinline__
#define __noinline__ __attribute__((noinline))

namespace dk_emu {

struct Idx {
  unsigned x, y, z;
};
extern thread_local Idx thread_idx, block_idx, block_dim, grid_dim;

void syncthreads();

// The SM count cudaDeviceGetAttribute reports for `device` (default 132). runtime.cu caches
// it per device at the first launch, so a test sets it before launching on that device.
void set_sm_count(int device, int sms);
long long threads_executed();  // CUDA threads run so far, all launches

// Runs kernel(args...) for every thread of grid x block (1-D launches only: the kernels
// use .x alone). The arguments are copied once, as a launch copies them to the device.
void run_grid(unsigned grid, unsigned block, void (*body)(void*), void* ctx);

template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, size_t shmem, cudaStream_t, A&&... args) {
  if (shmem != 0) {  // no kernel uses dynamic shared memory; the emulator does not provide it
    std::fprintf(stderr, "dk_emu: dynamic shared memory is not emulated\n");
    std::abort();
  }
  struct Ctx {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> a;
  } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(grid, block, [](void* c) {
    Ctx& x = *static_cast<Ctx*>(c);
    std::apply(x.k, x.a);
  }, &ctx);
}

}  // namespace dk_emu

#define threadIdx (::dk_emu::thread_idx)
#define blockIdx (::dk_emu::block_idx)
#define blockDim (::dk_emu::block_dim)
#define gridDim (::dk_emu::grid_dim)
#define __syncthreads() ::dk_emu::syncthreads()

#if defined(DIFFKERN_EMU_DEVICE_BRANCH)
// Exact host versions of the device intrinsics the kernel headers call.
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
inline uint32_t __float_as_uint(float f) { return __builtin_bit_cast(uint32_t, f); }
inline float __uint_as_float(uint32_t u) { return __builtin_bit_cast(float, u); }
#define __CUDA_ARCH__ 900
#endif
