// The entry of the SIMD tests, compiled with no instruction-set flags so that it runs on
// any x86-64: it asks the CPU for the set the checks were built for (DIFFKERN_TEST_ISA) and
// skips (CTest SKIP_RETURN_CODE 77) where it is missing, instead of dying on an illegal
// instruction (CI's machines have AVX2 but not AVX-512).
#include <cstdio>
#include <cstring>

int run_simd_tests();

static bool cpu_runs(const char* isa) {
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2");
  return false;
}

int main() {
  if (!cpu_runs(DIFFKERN_TEST_ISA)) {
    std::printf("skipped: this CPU does not run %s\n", DIFFKERN_TEST_ISA);
    return 77;
  }
  return run_simd_tests() == 0 ? 0 : 1;
}
