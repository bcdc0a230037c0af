// Large CPU outputs come from a small cache of buffers instead of malloc.
//
// Why: glibc hands blocks of many MiB back to the kernel on free (mmap, or trimming the
// heap top), so a sampling loop can page-fault its whole output on every step; on a VM that
// was seen at ~2 us per 4 KiB fault: benchmarks/step_speed.py's q_sample row (2 x 16 MiB
// out) at 17-20 ms in some processes and ~4.5 ms in others, its page-fault column telling
// which; the eager and diffusers rows still show the same. Reusing the last few freed buffers (at most 8, at most
// DIFFKERN_CPU_CACHE_MB = 256 MiB in all, least recently freed evicted first; 0 turns the
// cache off) makes a steady loop allocate nothing from the system. Buffers are 2 MiB
// aligned and advised as huge pages, so a first touch faults once per 2 MiB where allowed.
// Outputs below 128 KiB (glibc's default mmap threshold) come from at::empty as before.
#pragma once
#include <ATen/ATen.h>

namespace diffkern {
namespace cpu {

// at::empty(sizes, options) contiguous, from the cache when the output is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace diffkern
