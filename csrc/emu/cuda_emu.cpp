// The emulator's runtime: the launch loop, fibers for blocks that use __syncthreads, and
// the two CUDA runtime calls the kernels' launchers make (csrc/kernels/runtime.cu).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <vector>


#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define DK_EMU_ASAN 1
#else
#define DK_EMU_ASAN 0
#endif

namespace dk_emu {

thread_local Idx thread_idx, block_idx, block_dim, grid_dim;

namespace {

int sm_counts[64];  // 0: the default below
long long threads_run = 0;

// A block's threads run either directly (one call after another; __syncthreads is then a
// fatal error, never a silent no-op) or as fibers.
bool direct = false;

constexpr size_t kFiberStack = 256 * 1024;  // the GMM kernel keeps ~100 values per thread; ASan pads frames

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  bool done = false;
  void* fake_stack = nullptr;  // ASan's fake stack of the fiber while it is switched out
};
std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = -1;
bool barrier_hit = false;
void (*fiber_body)(void*) = nullptr;
void* fiber_ctx = nullptr;
[[maybe_unused]] const void* sched_bottom = nullptr;  // the scheduler's stack, for ASan's fiber switches
[[maybe_unused]] size_t sched_size = 0;

void fiber_entry() {
#if DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &sched_bottom, &sched_size);
#endif
  fiber_body(fiber_ctx);
  fibers[current].done = true;
#if DK_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, sched_bottom, sched_size);  // this fiber ends
#endif
  // returning resumes uc_link: the scheduler
}

// Runs one block as fibers, round-robin: each pass resumes every live thread until its
// next barrier or its end, so a pass ends with all live threads waiting at the barrier.
// Returns whether any thread reached a barrier.
bool run_block_fibers(unsigned block, void (*body)(void*), void* ctx) {
  if (fibers.size() < block) fibers.resize(block);
  fiber_body = body;
  fiber_ctx = ctx;
  barrier_hit = false;
  for (unsigned t = 0; t < block; ++t) {
    Fiber& f = fibers[t];
    if (!f.stack) {
      f.stack = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.stack == MAP_FAILED) {
        std::perror("dk_emu: fiber stack");
        std::abort();
      }
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
    f.done = false;
  }
  unsigned live = block;
  while (live > 0) {
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      if (f.done) continue;
      thread_idx = Idx{t, 0, 0};
      current = int(t);
      void* fake = nullptr;
#if DK_EMU_ASAN
      __sanitizer_start_switch_fiber(&fake, f.stack, kFiberStack);
#endif
      swapcontext(&scheduler, &f.ctx);
#if DK_EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      (void)fake;
      if (f.done) --live;
    }
  }
  current = -1;
  return barrier_hit;
}

}  // namespace

void syncthreads() {
  if (direct) {
    std::fprintf(stderr, "dk_emu: __syncthreads in a block run without fibers (a barrier only some blocks reach)\n");
    std::abort();
  }
  barrier_hit = true;
  Fiber& f = fibers[current];
#if DK_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, sched_bottom, sched_size);
#endif
  swapcontext(&f.ctx, &scheduler);
#if DK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &sched_bottom, &sched_size);
#endif
}

// Block 0 runs as fibers; if none of its threads met a barrier the kernel is taken to
// have none and the other blocks run directly (faster: no context switches), where a
// barrier after all aborts the run instead of being skipped.
void run_grid(unsigned grid, unsigned block, void (*body)(void*), void* ctx) {
  grid_dim = Idx{grid, 1, 1};
  block_dim = Idx{block, 1, 1};
  bool barriers = false;
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = Idx{b, 0, 0};
    if (b == 0 || barriers) {
      barriers = run_block_fibers(block, body, ctx) || barriers;
    } else {
      direct = true;
      for (unsigned t = 0; t < block; ++t) {
        thread_idx = Idx{t, 0, 0};
        body(ctx);
      }
      direct = false;
    }
  }
  threads_run += (long long)grid * block;
}

void set_sm_count(int device, int sms) { sm_counts[device & 63] = sms; }
long long threads_executed() { return threads_run; }

}  // namespace dk_emu

// The launchers' runtime calls. The SM count sets the grid (runtime.cu grid_for), and with
// it whether the grid-stride loops wrap: 1 SM caps a grid at 8 blocks of 256 threads.
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  const int sms = dk_emu::sm_counts[device & 63];
  *value = sms > 0 ? sms : 132;
  return cudaSuccess;
}

extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }
