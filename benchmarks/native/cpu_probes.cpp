// Micro-benchmarks behind numbers quoted in README.md and csrc/ comments, on one machine:
//   normals  ns per normal of the bulk fills in csrc/kernels/philox_simd.h (one thread):
//            the scalar loop as gcc vectorizes it for this build's -march, and the SIMD
//            policy the build targets.
//   stores   out = 0.9 x + 0.3 m over 16 MiB float32 arrays on all OpenMP threads, normal vs
//            streaming (non-temporal) stores, and a plain copy: what the CPU step ops'
//            streaming path (csrc/torch/cpu/elementwise.h) is measured against.
// Built by CMake as cpu_probes (-march=native) and cpu_probes_avx2 (-march=x86-64-v3):
//   cmake --build build/cmake --target cpu_probes cpu_probes_avx2
//   build/cmake/cpu_probes && build/cmake/cpu_probes_avx2
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/philox_simd.h"

using namespace diffkern;
using Clock = std::chrono::steady_clock;

template <class Fill>
static double ns_per_normal(Fill fill) {
  constexpr int64_t kGroups = 512, kTotal = int64_t(1) << 22;  // normals
  std::vector<float> buf(4 * kGroups);
  double best = 1e30, sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    for (int64_t g = 0; g < kTotal / 4; g += kGroups) {
      fill(PhiloxKey{1234, 8}, uint64_t(g), kGroups, buf.data());
      sink += buf[7];
    }
    best = std::min(best, std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / kTotal);
  }
  if (sink == 12345.678) std::printf(" ");  // keeps the fills from being optimized away
  return best;
}

static float* alloc(int64_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, size_t(2) << 20, size_t(n) * sizeof(float)) != 0) std::abort();
  return static_cast<float*>(p);
}

int main() {
  std::printf("normals (one thread, best of 5 over 2^22):\n");
  std::printf("  scalar loop  %.3f ns/normal\n", ns_per_normal(simd::fill_normals_scalar));
#if defined(DK_HAVE_SIMD_NORMALS)
  std::printf("  %-11s  %.3f ns/normal\n", simd::Widest::name(),
              ns_per_normal(simd::fill_normals_with<simd::Widest>));
#else
  std::printf("  (no SIMD policy in this build)\n");
#endif

  const int64_t n = int64_t(64) * 4 * 128 * 128;  // 16 MiB of float32
  const int nb = 5;                                // rotating buffers: 240 MiB, past any cache
  std::vector<float*> xs, ms, os;
  for (int b = 0; b < nb; ++b) {
    xs.push_back(alloc(n));
    ms.push_back(alloc(n));
    os.push_back(alloc(n));
    for (int64_t i = 0; i < n; ++i) xs[b][i] = float(i % 1000) * 1e-3f, ms[b][i] = 1.0f, os[b][i] = 0.0f;
  }
  std::printf("stores (%d threads, 16 MiB float32, median of 60):\n", omp_get_max_threads());
  const char* names[] = {"axpby, stores", "axpby, streaming", "copy"};
  for (int mode = 0; mode < 3; ++mode) {
#if !defined(__AVX__)
    if (mode == 1) continue;
#endif
    std::vector<double> ms_;
    for (int rep = 0; rep < 60; ++rep) {
      const float *x = xs[rep % nb], *m = ms[rep % nb];
      float* o = os[rep % nb];
      const auto t0 = Clock::now();
      if (mode == 0) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) o[i] = 0.9f * x[i] + 0.3f * m[i];
      } else if (mode == 1) {
#if defined(__AVX512F__)
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i += 16)
          _mm512_stream_ps(o + i, _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(0.9f), _mm512_load_ps(x + i)),
                                                _mm512_mul_ps(_mm512_set1_ps(0.3f), _mm512_load_ps(m + i))));
#elif defined(__AVX__)
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i += 8)
          _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(0.9f), _mm256_load_ps(x + i)),
                                                _mm256_mul_ps(_mm256_set1_ps(0.3f), _mm256_load_ps(m + i))));
#endif
      } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) o[i] = x[i];
      }
      ms_.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    std::sort(ms_.begin(), ms_.end());
    std::printf("  %-17s %.3f ms\n", names[mode], ms_[ms_.size() / 2]);
  }
  return 0;
}
