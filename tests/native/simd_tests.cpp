// The bulk normal fills (csrc/kernels/philox_simd.h) against the definition in philox.h
// (philox_normal4 group by group): bit-for-bit, for the scalar loop and every instruction
// set this binary was compiled for and this CPU runs, over counters whose low word wraps,
// extreme seeds and offsets, and group counts that leave every kind of tail.
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/philox_simd.h"

using namespace diffkern;

template <class Fill>
static int check(const char* name, Fill fill) {
  // starts: the group's low word wrapping, the per-sample-key region (kKeyedGroup) and its edge
  const uint64_t starts[] = {0, 1, 13, 0xFFFFFFF0ull, 0xFFFFFFFFull - 100, 0x123456789ull, kKeyedGroup - 9,
                             kKeyedGroup + 0xFFFFFFFFull - 20, ~0ull - 600};
  const uint64_t seeds[] = {0, 1234, ~0ull, 0x9E3779B97F4A7C15ull};
  // offsets: counter word 0 wrapping into word 1 (offset/4 = 2^32 - 1, 2^32), the top
  const uint64_t offsets[] = {0, 4, 0xFFFFFFFFull, 4 * 0xFFFFFFFFull, 4 * 0x100000000ull, ~0ull - 3};
  const int64_t counts[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 509, 512, 513, 1100};
  std::vector<float> want(4 * 1100 + 64), got(4 * 1100 + 64);
  int failures = 0, cases = 0;
  for (uint64_t g0 : starts)
    for (uint64_t seed : seeds)
      for (uint64_t offset : offsets)
        for (int64_t n : counts) {
          const PhiloxKey key{seed, offset};
          for (int64_t i = 0; i < n; ++i) {
            const Float4 z = philox_normal4(key, g0 + uint64_t(i));
            for (int j = 0; j < 4; ++j) want[4 * i + j] = z.v[j];
          }
          got.assign(got.size(), -7.0f);
          fill(key, g0, n, got.data());
          ++cases;
          if (std::memcmp(want.data(), got.data(), size_t(4 * n) * sizeof(float)) != 0 || got[4 * n] != -7.0f) {
            if (++failures <= 5)
              std::printf("FAIL %s g0=%llu seed=%llu offset=%llu n=%lld\n", name, (unsigned long long)g0,
                          (unsigned long long)seed, (unsigned long long)offset, (long long)n);
          }
        }
  std::printf("%s: %d of %d cases differ from philox_normal4\n", name, failures, cases);
  return failures;
}

// Called from simd_tests_main.cpp (built without ISA flags) only once the CPU is known to
// run what this file was compiled for: with -mavx512f the compiler may use AVX-512 anywhere
// here, the scalar loop included.
int run_simd_tests() {
  int failures = check("scalar", simd::fill_normals_scalar);
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  failures += check("avx512", simd::fill_normals_with<simd::V512>);
#endif
#if defined(__AVX2__)
  failures += check("avx2", simd::fill_normals_with<simd::V256>);
#endif
  return failures;
}
