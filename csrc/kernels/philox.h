// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and
// the Box-Muller normal transform, evaluated identically on the host and the device.
//
// Keying, shared with diffkern/_rng.py (the oracle): element i of a call keyed by
// (seed, offset) is lane i % 4 of philox(counter = (c_lo, c_hi, g_lo, g_hi),
// key = (seed_lo, seed_hi)) with c = offset / 4 and g = i / 4. The value depends on
// nothing else: not on the device, the thread count, the launch geometry or how the batch
// is split.
//
// Why this layout: it is torch's. torch's CUDA Philox kernels call
// curand_init(seed, subsequence = thread, offset), i.e. counter = (offset/4 + k, thread)
// for the thread's k-th draw, k < increment/4. diffkern's group g is such a "thread" and
// a call reserves its own 4 offsets of the generator, so its counters (offset/4, g) were
// never drawn by any torch call on the same generator (with the groups in the low words
// and the offset in the high ones, a call at offset O reused thread O's counters).
//
// Per-sample keyed noise (seeds=, step=) is the stream keyed by (seed, 4 step) at groups
// kKeyedGroup + j/4 (j: the element's index within its sample): the top bit of g keeps it
// apart from every generator-driven counter (groups < 2^62 there).
//
// log/sin/cos are Cephes-style float polynomials instead of libm/CUDA intrinsics because
// (1) they vectorize on the CPU (gcc does not vectorize calls to logf/sinf/cosf), and
// (2) the same operations on both sides make CPU and GPU noise agree to an ulp or two.
#pragma once
#include "common.h"

namespace diffkern {

struct PhiloxKey {
  uint64_t seed;
  uint64_t offset;  // torch's Philox offset: counter words 0-1 hold offset / 4
};

struct Uint4 {
  uint32_t x, y, z, w;
};

// Returned by value (not written through pointers) so that the compiler keeps them in
// registers: stores to a local array inside the host loop stop gcc from vectorizing it.
struct Float2 {
  float a, b;
};

struct Float4 {
  float v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DK_HD Uint4 philox_round(Uint4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
  const uint32_t hi0 = __umulhi(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
  const uint32_t hi1 = __umulhi(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
#else
  const uint64_t p0 = uint64_t(kPhiloxM0) * c.x;  // 32x32->64: vpmuludq when vectorized
  const uint64_t p1 = uint64_t(kPhiloxM1) * c.z;
  const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
  const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
#endif
  return Uint4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Ten rounds written out: straight-line code is what lets gcc vectorize the caller's
// loop over counters (a loop with a branch on the round number is not vectorized).
DK_HD Uint4 philox4x32_10(Uint4 c, uint32_t k0, uint32_t k1) {
  c = philox_round(c, k0, k1);
  c = philox_round(c, k0 + 1u * kPhiloxW0, k1 + 1u * kPhiloxW1);
  c = philox_round(c, k0 + 2u * kPhiloxW0, k1 + 2u * kPhiloxW1);
  c = philox_round(c, k0 + 3u * kPhiloxW0, k1 + 3u * kPhiloxW1);
  c = philox_round(c, k0 + 4u * kPhiloxW0, k1 + 4u * kPhiloxW1);
  c = philox_round(c, k0 + 5u * kPhiloxW0, k1 + 5u * kPhiloxW1);
  c = philox_round(c, k0 + 6u * kPhiloxW0, k1 + 6u * kPhiloxW1);
  c = philox_round(c, k0 + 7u * kPhiloxW0, k1 + 7u * kPhiloxW1);
  c = philox_round(c, k0 + 8u * kPhiloxW0, k1 + 8u * kPhiloxW1);
  return philox_round(c, k0 + 9u * kPhiloxW0, k1 + 9u * kPhiloxW1);
}

// The group index of element j of a sample under per-sample keys: kKeyedGroup + j / 4.
constexpr uint64_t kKeyedGroup = uint64_t(1) << 63;

DK_HD Uint4 philox_bits(PhiloxKey key, uint64_t group) {
  const uint64_t c = key.offset >> 2;
  return philox4x32_10(Uint4{uint32_t(c), uint32_t(c >> 32), uint32_t(group), uint32_t(group >> 32)},
                       uint32_t(key.seed), uint32_t(key.seed >> 32));
}

// Natural log for u in [2^-24, 1]: u = m 2^e with m in [sqrt(.5), sqrt(2)), then a
// degree-9 polynomial in m - 1 (Cephes logf). Branch-free so it vectorizes.
DK_HD float log_poly(float u) {
  const uint32_t bits = float_as_bits(u);
  int32_t ei = int32_t((bits >> 23) & 0xFFu) - 126;
  float m = bits_as_float((bits & 0x7FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  ei -= int32_t(small);  // arithmetic, not a branch: keeps the caller's loop vectorizable
  const float e = float(ei);
  m = (small ? m + m : m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = (y * m) * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// sin and cos of 2 pi v for v in [0, 1) with 23 fractional bits: the quadrant split is
// exact, leaving |a| <= pi/4 for the Cephes sinf/cosf polynomials.
DK_HD Float2 sincos_2pi(float v) {  // {sin, cos}
  const float q = float(int32_t(v * 4.0f + 0.5f));  // floor: the argument is non-negative
  const float a = (v - q * 0.25f) * 6.28318530717958647692f;
  const float a2 = a * a;
  float s = -1.9515295891e-4f;
  s = s * a2 + 8.3321608736e-3f;
  s = s * a2 + -1.6666654611e-1f;
  s = a + (a * a2) * s;
  float c = 2.443315711809948e-5f;
  c = c * a2 + -1.388731625493765e-3f;
  c = c * a2 + 4.166664568298827e-2f;
  c = (1.0f - 0.5f * a2) + (a2 * a2) * c;
  // Rotate by q quarter turns without branches: odd q swaps sin and cos, and the signs
  // flip on bit 1 of q (sin) and of q + 1 (cos).
  const uint32_t qi = uint32_t(int32_t(q));
  const bool swap = (qi & 1u) != 0;
  const float sv = swap ? c : s, cv = swap ? s : c;
  return Float2{bits_as_float(float_as_bits(sv) ^ ((qi & 2u) << 30)),
                bits_as_float(float_as_bits(cv) ^ (((qi + 1u) & 2u) << 30))};
}

DK_HD Float2 box_muller(uint32_t a, uint32_t b) {
  const float u = (float(a >> 9) + 0.5f) * 1.1920928955078125e-07f;  // (0, 1), exact
  const float v = float(b >> 9) * 1.1920928955078125e-07f;           // [0, 1), exact
  const float r = dk_sqrt<float>(-2.0f * log_poly(u));
  const Float2 sc = sincos_2pi(v);
  return Float2{r * sc.b, r * sc.a};
}

// The four normals of counter group `group` (logical elements 4*group .. 4*group+3).
DK_HD Float4 philox_normal4(PhiloxKey key, uint64_t group) {
  const Uint4 r = philox_bits(key, group);
  const Float2 p = box_muller(r.x, r.y), q = box_muller(r.z, r.w);
  return Float4{{p.a, p.b, q.a, q.b}};
}

// One element's normal; computes its whole group, for paths that need a single value.
DK_HD float philox_normal_at(PhiloxKey key, uint64_t index) {
  return philox_normal4(key, index >> 2).v[index & 3];
}

// Per-sample keys: the stream of the sample keyed by (seed, step); element j of the
// sample is lane j % 4 of group kKeyedGroup + j / 4. step < 2^62.
DK_HD PhiloxKey keyed_key(uint64_t seed, uint64_t step) { return PhiloxKey{seed, step << 2}; }

DK_HD float keyed_normal_at(uint64_t seed, uint64_t step, uint64_t j) {
  return philox_normal4(keyed_key(seed, step), kKeyedGroup + (j >> 2)).v[j & 3];
}

// A step's noise under per-sample keys (seeds=, step=), drawn by the step kernel itself:
// element j of sample b is keyed_normal_at(seeds[b], step, j), the numbers of the
// keyed_normal op, so the noise is the same whatever the batch split or the device.
struct KeyedArgs {
  const int64_t* seeds = nullptr;     // null: not keyed; else 1 (every sample) or one per sample
  int64_t nseeds = 1;
  const int64_t* step_ptr = nullptr;  // read in the kernel (CUDA graph replay), else `step`
  uint64_t step = 0;
  int64_t inner = 1;                  // elements per sample, in logical order
  DK_HD uint64_t seed_of(int64_t b) const { return uint64_t(seeds[nseeds == 1 ? 0 : b]); }
};

}  // namespace diffkern
