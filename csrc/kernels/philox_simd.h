// philox_normal4 for a register's worth of counter groups at once, with AVX-512 or AVX2
// intrinsics: host only, and bit-for-bit the scalar functions of philox.h (the same integer
// arithmetic, the same float operations in the same order, no fused multiply-adds), which
// stay the definition. tests/native/simd_tests.cpp checks the equality for both widths.
//
// Why it exists: gcc vectorizes the scalar loop over groups at the width of its 64-bit
// counter and products (8 lanes with AVX-512; not at all with AVX2 alone); written out
// here, Philox runs on 64-bit lanes without blends and the transform on full float
// registers (benchmarks/native/cpu_probes.cpp times both).
//
// The algorithm is written once over a policy (V512, V256) that names the instructions.
// fill_normals() is the entry point: the widest policy the build targets, else the scalar
// loop below. `cpu_probes` (benchmarks/native) times each.
#pragma once
#include "philox.h"

namespace diffkern {
namespace simd {

// out[4 i + j] = philox_normal4(key, first_group + i).v[j] for i < ngroups: the scalar
// functions in a loop over groups that gcc vectorizes by itself (where it does: with
// AVX-512, not with AVX2 alone). Results go through four arrays because a store to
// out[4 i + j] inside the loop kept gcc from vectorizing it.
inline void fill_normals_scalar(PhiloxKey key, uint64_t first_group, int64_t ngroups, float* out) {
  constexpr int64_t kBlock = 512;
  alignas(64) float z0[kBlock], z1[kBlock], z2[kBlock], z3[kBlock];
  for (int64_t b = 0; b < ngroups; b += kBlock) {
    const int64_t n = ngroups - b < kBlock ? ngroups - b : kBlock;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const Float4 z = philox_normal4(key, first_group + uint64_t(b + i));
      z0[i] = z.v[0];
      z1[i] = z.v[1];
      z2[i] = z.v[2];
      z3[i] = z.v[3];
    }
    float* o = out + 4 * b;
    for (int64_t i = 0; i < n; ++i) {
      o[4 * i + 0] = z0[i];
      o[4 * i + 1] = z1[i];
      o[4 * i + 2] = z2[i];
      o[4 * i + 3] = z3[i];
    }
  }
}

}  // namespace simd
}  // namespace diffkern

#if !defined(__CUDACC__) && (defined(__AVX2__) || (defined(__AVX512F__) && defined(__AVX512DQ__)))
#include <immintrin.h>
#define DK_HAVE_SIMD_NORMALS 1
// gcc 12 warns inside its own intrinsics headers (_mm512_undefined_*; GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace diffkern {
namespace simd {

#if defined(__AVX512F__) && defined(__AVX512DQ__)
struct V512 {
  static constexpr int kWidth = 16;  // floats per register = counter groups per batch
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static const char* name() { return "avx512"; }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F i2f(I a) { return _mm512_cvtepi32_ps(a); }
  static I f2i_trunc(F a) { return _mm512_cvttps_epi32(a); }
  static I bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F add_where(F a, M m, F b) { return _mm512_mask_add_ps(a, m, a, b); }  // m ? a + b : a
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, a, b); }      // m ? b : a
  static I dec_where(I a, M m) { return _mm512_mask_sub_epi32(a, m, a, set1_32(1)); }
  static M odd(I a) { return _mm512_test_epi32_mask(a, set1_32(1)); }
  static I set1_32(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static I add_32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub_32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int N>
  static I srli_32(I a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static I slli_32(I a) { return _mm512_slli_epi32(a, N); }
  static I set1_64(uint64_t v) { return _mm512_set1_epi64(int64_t(v)); }
  static I iota_64() { return _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7); }
  static I add_64(I a, I b) { return _mm512_add_epi64(a, b); }
  static I shr32_64(I a) { return _mm512_srli_epi64(a, 32); }
  static I mul_lo32(I a, I b) { return _mm512_mul_epu32(a, b); }  // full products of the lanes' low words
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  // Lower 32 bits of the 64-bit lanes of a, then of b.
  static I pack_lo(I a, I b) {
    return _mm512_permutex2var_epi32(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                                     b);
  }
  // out[4 g + j] = nj[g]: the 4 x 16 -> 16 x 4 transpose.
  static void store_interleaved(float* out, F n0, F n1, F n2, F n3) {
    // After the unpacks, 128-bit lane j of gk holds group 4j + k.
    const F t0 = _mm512_unpacklo_ps(n0, n1), t1 = _mm512_unpackhi_ps(n0, n1);
    const F t2 = _mm512_unpacklo_ps(n2, n3), t3 = _mm512_unpackhi_ps(n2, n3);
    const F g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    const F g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const F g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    const F v01lo = _mm512_shuffle_f32x4(g0, g1, 0x44), v23lo = _mm512_shuffle_f32x4(g2, g3, 0x44);
    const F v01hi = _mm512_shuffle_f32x4(g0, g1, 0xEE), v23hi = _mm512_shuffle_f32x4(g2, g3, 0xEE);
    _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(v01lo, v23lo, 0x88));   // groups 0..3
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(v01lo, v23lo, 0xDD));  // groups 4..7
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(v01hi, v23hi, 0x88));  // groups 8..11
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(v01hi, v23hi, 0xDD));  // groups 12..15
  }
};
#endif

#if defined(__AVX2__)
struct V256 {
  static constexpr int kWidth = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones lanes where true
  static const char* name() { return "avx2"; }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F i2f(I a) { return _mm256_cvtepi32_ps(a); }
  static I f2i_trunc(F a) { return _mm256_cvttps_epi32(a); }
  static I bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(I a) { return _mm256_castsi256_ps(a); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F add_where(F a, M m, F b) { return _mm256_add_ps(a, _mm256_and_ps(m, b)); }  // a + 0 is exact
  static F select(M m, F a, F b) { return _mm256_blendv_ps(a, b, m); }
  static I dec_where(I a, M m) { return _mm256_add_epi32(a, bits(m)); }  // true lanes are -1
  static M odd(I a) { return from_bits(_mm256_cmpeq_epi32(_mm256_and_si256(a, set1_32(1)), set1_32(1))); }
  static I set1_32(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static I add_32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub_32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int N>
  static I srli_32(I a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static I slli_32(I a) { return _mm256_slli_epi32(a, N); }
  static I set1_64(uint64_t v) { return _mm256_set1_epi64x(int64_t(v)); }
  static I iota_64() { return _mm256_setr_epi64x(0, 1, 2, 3); }
  static I add_64(I a, I b) { return _mm256_add_epi64(a, b); }
  static I shr32_64(I a) { return _mm256_srli_epi64(a, 32); }
  static I mul_lo32(I a, I b) { return _mm256_mul_epu32(a, b); }
  static I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static I pack_lo(I a, I b) {
    // per 128-bit half: a's two low words, then b's; then order the 64-bit chunks a a b b
    const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(s), _MM_SHUFFLE(3, 1, 2, 0));
  }
  static void store_interleaved(float* out, F n0, F n1, F n2, F n3) {
    // After the unpacks, 128-bit half h of gk holds group 4h + k.
    const F t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
    const F t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
    const F g0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const F g1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    const F g2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    const F g3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(g0, g1, 0x20));   // groups 0, 1
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g2, g3, 0x20));   // groups 2, 3
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(g0, g1, 0x31));  // groups 4, 5
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g2, g3, 0x31));  // groups 6, 7
  }
};
#endif

// Philox keeps each group's four words in 64-bit lanes: one vpmuludq then gives the whole
// 32x32->64 product, and the upper halves of the lanes may hold garbage because vpmuludq
// reads only the lower ones (and the output keeps only those). Per round and register:
// two multiplies, two shifts, two three-way xors, and no blends.
template <class V>
struct U4 {
  typename V::I x, y, z, w;
};

template <class V>
inline U4<V> round(U4<V> c, uint32_t k0, uint32_t k1) {
  const auto p0 = V::mul_lo32(c.x, V::set1_64(kPhiloxM0));
  const auto p1 = V::mul_lo32(c.z, V::set1_64(kPhiloxM1));
  return U4<V>{V::xor3(V::shr32_64(p1), c.y, V::set1_64(k0)), p1, V::xor3(V::shr32_64(p0), c.w, V::set1_64(k1)),
               p0};
}

template <class V>
inline typename V::F madd(typename V::F a, typename V::F b, float c) {  // (a * b) + c, two roundings
  return V::add(V::mul(a, b), V::set1(c));
}

// log_poly of philox.h.
template <class V>
inline typename V::F log_poly(typename V::F u) {
  using F = typename V::F;
  const auto bits = V::bits(u);
  auto ei = V::sub_32(V::and_(V::template srli_32<23>(bits), V::set1_32(0xFF)), V::set1_32(126));
  F m = V::from_bits(V::or_(V::and_(bits, V::set1_32(0x7FFFFF)), V::set1_32(0x3F000000)));
  const auto small = V::lt(m, V::set1(0.707106781186547524f));
  ei = V::dec_where(ei, small);
  const F e = V::i2f(ei);
  m = V::sub(V::add_where(m, small, m), V::set1(1.0f));
  const F z = V::mul(m, m);
  F y = V::set1(7.0376836292e-2f);
  y = madd<V>(y, m, -1.1514610310e-1f);
  y = madd<V>(y, m, 1.1676998740e-1f);
  y = madd<V>(y, m, -1.2420140846e-1f);
  y = madd<V>(y, m, 1.4249322787e-1f);
  y = madd<V>(y, m, -1.6668057665e-1f);
  y = madd<V>(y, m, 2.0000714765e-1f);
  y = madd<V>(y, m, -2.4999993993e-1f);
  y = madd<V>(y, m, 3.3333331174e-1f);
  y = V::mul(V::mul(y, m), z);
  y = V::add(y, V::mul(e, V::set1(-2.12194440e-4f)));
  y = V::sub(y, V::mul(V::set1(0.5f), z));
  return V::add(V::add(m, y), V::mul(e, V::set1(0.693359375f)));
}

// box_muller of philox.h: out_a = r cos(2 pi v), out_b = r sin(2 pi v).
template <class V>
inline void box_muller(typename V::I a, typename V::I b, typename V::F& out_a, typename V::F& out_b) {
  using F = typename V::F;
  const F scale = V::set1(1.1920928955078125e-07f);
  const F u = V::mul(V::add(V::i2f(V::template srli_32<9>(a)), V::set1(0.5f)), scale);
  const F v = V::mul(V::i2f(V::template srli_32<9>(b)), scale);
  const F r = V::sqrt(V::mul(V::set1(-2.0f), log_poly<V>(u)));

  const auto qi = V::f2i_trunc(V::add(V::mul(v, V::set1(4.0f)), V::set1(0.5f)));
  const F q = V::i2f(qi);
  const F an = V::mul(V::sub(v, V::mul(q, V::set1(0.25f))), V::set1(6.28318530717958647692f));
  const F a2 = V::mul(an, an);
  F s = V::set1(-1.9515295891e-4f);
  s = madd<V>(s, a2, 8.3321608736e-3f);
  s = madd<V>(s, a2, -1.6666654611e-1f);
  s = V::add(an, V::mul(V::mul(an, a2), s));
  F c = V::set1(2.443315711809948e-5f);
  c = madd<V>(c, a2, -1.388731625493765e-3f);
  c = madd<V>(c, a2, 4.166664568298827e-2f);
  c = V::add(V::sub(V::set1(1.0f), V::mul(V::set1(0.5f), a2)), V::mul(V::mul(a2, a2), c));
  const auto swap = V::odd(qi);
  const F sv = V::select(swap, s, c), cv = V::select(swap, c, s);
  const auto two = V::set1_32(2);
  const auto ssign = V::template slli_32<30>(V::and_(qi, two));
  const auto csign = V::template slli_32<30>(V::and_(V::add_32(qi, V::set1_32(1)), two));
  out_a = V::mul(r, V::from_bits(V::xor_(V::bits(cv), csign)));
  out_b = V::mul(r, V::from_bits(V::xor_(V::bits(sv), ssign)));
}

// The normals of groups g0 .. g0 + NB W - 1, interleaved as the logical elements
// 4 g0 .. 4 g0 + 4 NB W - 1. NB independent batches are interleaved so that one batch's
// multiply latency hides behind another's work.
template <class V, int NB>
inline void normals(PhiloxKey key, uint64_t g0, float* out) {
  constexpr int W = V::kWidth, H = W / 2;  // groups per batch; 64-bit lanes per register
  U4<V> c[2 * NB];
  const uint64_t ctr = key.offset >> 2;  // philox_bits' layout: (offset / 4, group)
  for (int h = 0; h < 2 * NB; ++h) {
    const auto g = V::add_64(V::set1_64(g0 + uint64_t(H) * uint64_t(h)), V::iota_64());
    c[h] = U4<V>{V::set1_64(uint32_t(ctr)), V::set1_64(ctr >> 32), g, V::shr32_64(g)};
  }
  const uint32_t k0 = uint32_t(key.seed), k1 = uint32_t(key.seed >> 32);
  for (uint32_t r = 0; r < 10; ++r)
    for (int h = 0; h < 2 * NB; ++h) c[h] = round<V>(c[h], k0 + r * kPhiloxW0, k1 + r * kPhiloxW1);
  for (int b = 0; b < NB; ++b) {
    const U4<V>&lo = c[2 * b], &hi = c[2 * b + 1];
    typename V::F n0, n1, n2, n3;
    box_muller<V>(V::pack_lo(lo.x, hi.x), V::pack_lo(lo.y, hi.y), n0, n1);
    box_muller<V>(V::pack_lo(lo.z, hi.z), V::pack_lo(lo.w, hi.w), n2, n3);
    V::store_interleaved(out + 4 * W * b, n0, n1, n2, n3);
  }
}

// out[4 i + j] = philox_normal4(key, first_group + i).v[j] for i < ngroups.
template <class V>
inline void fill_normals_with(PhiloxKey key, uint64_t first_group, int64_t ngroups, float* out) {
  constexpr int W = V::kWidth, NB = 2;
  int64_t i = 0;
  for (; i + NB * W <= ngroups; i += NB * W) normals<V, NB>(key, first_group + uint64_t(i), out + 4 * i);
  for (; i + W <= ngroups; i += W) normals<V, 1>(key, first_group + uint64_t(i), out + 4 * i);
  fill_normals_scalar(key, first_group + uint64_t(i), ngroups - i, out + 4 * i);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
using Widest = V512;
#else
using Widest = V256;
#endif

}  // namespace simd
}  // namespace diffkern
#pragma GCC diagnostic pop
#endif

namespace diffkern {
namespace simd {

inline void fill_normals(PhiloxKey key, uint64_t first_group, int64_t ngroups, float* out) {
#if defined(DK_HAVE_SIMD_NORMALS)
  fill_normals_with<Widest>(key, first_group, ngroups, out);
#else
  fill_normals_scalar(key, first_group, ngroups, out);
#endif
}

// out[i] = the per-sample-keyed normal of logical element e0 + i (i < n) of a tensor of
// `inner` elements per sample, sample b keyed by (seeds[nseeds == 1 ? 0 : b], step): the
// range is cut at sample boundaries, each piece drawn as whole groups by fill_normals with
// the partial groups at its ends drawn alone (a sample need not start on a group).
inline void fill_keyed_normals(const int64_t* seeds, int64_t nseeds, uint64_t step, int64_t inner, int64_t e0,
                               int64_t n, float* out) {
  const int64_t end = e0 + n;
  for (int64_t e = e0; e < end;) {
    const int64_t b = e / inner;
    const int64_t r1 = end < (b + 1) * inner ? end : (b + 1) * inner;
    const PhiloxKey key = keyed_key(uint64_t(seeds[nseeds == 1 ? 0 : b]), step);
    int64_t j = e - b * inner;
    const int64_t jend = r1 - b * inner;
    float* o = out + (e - e0);
    if (j & 3) {
      const Float4 z = philox_normal4(key, kKeyedGroup + uint64_t(j >> 2));
      for (; (j & 3) != 0 && j < jend; ++j) *o++ = z.v[j & 3];
    }
    const int64_t full = (jend - j) >> 2;
    if (full > 0) {
      fill_normals(key, kKeyedGroup + uint64_t(j >> 2), full, o);
      o += 4 * full;
      j += 4 * full;
    }
    if (j < jend) {
      const Float4 z = philox_normal4(key, kKeyedGroup + uint64_t(j >> 2));
      for (; j < jend; ++j) *o++ = z.v[j & 3];
    }
    e = r1;
  }
}

}  // namespace simd
}  // namespace diffkern
