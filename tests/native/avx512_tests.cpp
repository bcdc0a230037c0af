// The AVX-512 normals (csrc/kernels/philox_avx512.h) against the scalar definition in
// philox.h: bit-for-bit, over counters whose low word wraps, extreme seeds and offsets,
// and group counts that leave every kind of tail. Exits 77 (CTest: skipped) where the
// compiler or the CPU lacks AVX-512.
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/philox_avx512.h"

int main() {
#if !defined(DK_HAVE_AVX512_NORMALS)
  std::printf("compiled without AVX-512: skipped\n");
  return 77;
#else
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) {
    std::printf("this CPU has no AVX-512: skipped\n");
    return 77;
  }
  using namespace diffkern;
  const uint64_t starts[] = {0, 1, 13, 0xFFFFFFF0ull, 0xFFFFFFFFull - 100, 0x123456789ull, ~0ull - 600};
  const uint64_t seeds[] = {0, 1234, ~0ull, 0x9E3779B97F4A7C15ull};
  const uint64_t offsets[] = {0, 4, 0xFFFFFFFFull, ~0ull - 3};
  const int64_t counts[] = {0, 1, 15, 16, 17, 31, 32, 33, 509, 512};
  std::vector<float> want(4 * 512 + 64), got(4 * 512 + 64);
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
          avx512::fill_normals(key, g0, n, got.data());
          ++cases;
          if (std::memcmp(want.data(), got.data(), size_t(4 * n) * sizeof(float)) != 0 || got[4 * n] != -7.0f) {
            if (++failures <= 5)
              std::printf("FAIL g0=%llu seed=%llu offset=%llu n=%lld\n", (unsigned long long)g0,
                          (unsigned long long)seed, (unsigned long long)offset, (long long)n);
          }
        }
  std::printf("%d of %d cases differ from the scalar normals\n", failures, cases);
  return failures == 0 ? 0 : 1;
#endif
}
