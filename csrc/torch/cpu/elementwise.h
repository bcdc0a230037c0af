// The CPU driver of every elementwise step op: chunks of the logical index range over
// at::parallel_for, in-kernel normals drawn a chunk at a time into an L1-resident buffer
// (a vectorizable loop over Philox groups), then the op's update over the chunk.
// The update and the noise are the shared functions of csrc/kernels.
#pragma once
#include <ATen/Parallel.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "../../kernels/philox_simd.h"
#include "../common.h"
#include "output_cache.h"

namespace diffkern {
namespace cpu {

constexpr int64_t kChunk = 2048;  // elements; a multiple of 4 so chunks start on a Philox group

// Outputs this large bypass the cache (non-temporal stores): they cannot stay in it anyway,
// and a normal store first reads every line it writes, a third more memory traffic for a
// two-input step.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// dst[0, n) = src[0, n) with streaming stores; dst 64-byte aligned. The caller fences.
inline void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
#elif defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_load_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// fp16/bf16 <-> float for a chunk, vectorized: the scalar c10 conversions inside the op's
// loop kept it from vectorizing (a bf16 DDIM step took 3x a float32 one). Same results as
// c10::BFloat16(float) / c10::Half(float): round to nearest even; a NaN stays a NaN.
inline void widen(const c10::BFloat16* s, float* d, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = bits_as_float(uint32_t(u[i]) << 16);
}

inline void narrow(const float* s, c10::BFloat16* d, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = float_as_bits(s[i]);
    u[i] = s[i] != s[i] ? uint16_t(0x7FC0) : uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}

inline void widen(const c10::Half* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = float(s[i]);
}

inline void narrow(const float* s, c10::Half* d, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) d[i] = c10::Half(s[i]);
}

template <class T>
struct IsHalf {  // fp16 / bf16 storage: staged through float buffers of kStage elements
  static constexpr bool value = !std::is_same<T, float>::value && !std::is_same<T, double>::value;
  static constexpr int64_t kStage = value ? kChunk : 1;
};

// The contiguous loop over [e, r1) of one sample: inputs TI, outputs TO, math in C.
template <class TI, class TO, class C, class Op>
inline void fast_span(const Op& op, const StepCoeffs<C>& k, const TI* xp, const TI* mp, const TI* np, const float* z,
                      TO* out, TO* nout, int64_t e, int64_t r1, bool draw, bool has_noise, bool write_noise) {
  if (draw) {
#pragma omp simd
    for (int64_t i = e; i < r1; ++i) {
      const C zi = C(z[i]);
      out[i] = TO(op.apply(k, C(xp[i]), Op::kHasModel ? C(mp[i]) : C(0), zi, true));
      if (Op::kWritesNoise && write_noise) nout[i] = TO(zi);
    }
  } else if (has_noise) {
#pragma omp simd
    for (int64_t i = e; i < r1; ++i)
      out[i] = TO(op.apply(k, C(xp[i]), Op::kHasModel ? C(mp[i]) : C(0), C(np[i]), true));
  } else {
#pragma omp simd
    for (int64_t i = e; i < r1; ++i) out[i] = TO(op.apply(k, C(xp[i]), Op::kHasModel ? C(mp[i]) : C(0), C(0), false));
  }
}

template <class T>
inline const T& at_(const Operand& o, int64_t i) {
  const T* p = static_cast<const T*>(o.data);
  return o.contiguous ? p[i] : p[o.ix.offset(i)];
}

struct StepIO {
  Operand x, m, noise;     // m / noise unused when absent
  void* out = nullptr;     // contiguous, the output's shape
  void* noise_out = nullptr;
  bool has_m = false, has_noise = false, draw = false;
  PhiloxKey key{0, 0};
};

// Runs `op` over all elements. Math type C: double for double storage, float otherwise;
// coefficients are formed in double once per sample (or once per call when they do not
// depend on the sample) and rounded to C.
template <class T, class Op>
void run_elementwise(const Op& op, const StepIO& io, int64_t numel, int64_t inner, bool per_sample) {
  using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  if (numel == 0) return;
  const bool has_z = io.draw || io.has_noise;
  const StepCoeffs<C> shared = cast_coeffs<C>(op.template coeffs<double>(0));
  const bool fast = io.x.contiguous && (!io.has_m || io.m.contiguous) && (!io.has_noise || io.noise.contiguous);
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  // Streaming: float outputs written in the contiguous fast path, staged a chunk at a time
  // in L1 (chunks start 8 KiB apart, so aligned whenever the output is).
  const bool stream = std::is_same<T, float>::value && fast && numel * int64_t(sizeof(T)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(io.out) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(io.noise_out) % 64 == 0;
  // Staged: fp16/bf16 in the fast path, widened to float a chunk at a time in L1 buffers.
  const bool staged = IsHalf<T>::value && fast;
  at::parallel_for(0, nchunks, 16, [&](int64_t cbeg, int64_t cend) {
    alignas(64) float zbuf[kChunk];
    alignas(64) T obuf[kChunk];
    alignas(64) float fx[IsHalf<T>::kStage], fm[IsHalf<T>::kStage], fn[IsHalf<T>::kStage], fo[IsHalf<T>::kStage];
    int64_t cached_b = -1;
    StepCoeffs<C> k = shared;
    // Chunks exist for the L1 buffers; without them a thread's whole range is one span.
    const int64_t eend = std::min(numel, cend * kChunk);
    const int64_t span = (io.draw || stream || staged) ? kChunk : eend;
    for (int64_t e0 = cbeg * kChunk; e0 < eend; e0 += span) {
      const int64_t e1 = std::min(eend, e0 + span);
      T* out = stream ? obuf - e0 : static_cast<T*>(io.out);
      T* nout = static_cast<T*>(io.noise_out);
      if (io.draw) simd::fill_normals(io.key, uint64_t(e0 / 4), (e1 - e0 + 3) / 4, zbuf);
      if constexpr (IsHalf<T>::value) {
        if (staged) {
          widen(static_cast<const T*>(io.x.data) + e0, fx, e1 - e0);
          if (io.has_m) widen(static_cast<const T*>(io.m.data) + e0, fm, e1 - e0);
          if (io.has_noise) widen(static_cast<const T*>(io.noise.data) + e0, fn, e1 - e0);
        }
      }
      for (int64_t e = e0; e < e1;) {
        const int64_t b = e / inner;
        const int64_t r1 = std::min(e1, (b + 1) * inner);
        if (per_sample && b != cached_b) {
          k = cast_coeffs<C>(op.template coeffs<double>(b));
          cached_b = b;
        }
        const float* z = zbuf - e0;
        if (staged) {  // float buffers indexed like the tensors (offset by e0)
          fast_span<float, float, C>(op, k, fx - e0, fm - e0, fn - e0, z, fo - e0, static_cast<float*>(nullptr), e, r1,
                                     io.draw, io.has_noise, false);
        } else if (fast) {
          fast_span<T, T, C>(op, k, static_cast<const T*>(io.x.data), static_cast<const T*>(io.m.data),
                             static_cast<const T*>(io.noise.data), z, out, nout, e, r1, io.draw, io.has_noise, !stream);
        } else {
          for (int64_t i = e; i < r1; ++i) {
            const C zi = io.draw ? C(z[i]) : (io.has_noise ? C(at_<T>(io.noise, i)) : C(0));
            const C mi = Op::kHasModel ? C(at_<T>(io.m, i)) : C(0);
            out[i] = T(op.apply(k, C(at_<T>(io.x, i)), mi, zi, has_z));
            if (Op::kWritesNoise && io.draw) nout[i] = T(zi);
          }
        }
        e = r1;
      }
      if constexpr (IsHalf<T>::value) {
        if (staged) {
          narrow(fo, out + e0, e1 - e0);
          if (Op::kWritesNoise && io.draw) narrow(zbuf, nout + e0, e1 - e0);
        }
      }
      if (stream) {
        stream_copy(reinterpret_cast<float*>(io.out) + e0, reinterpret_cast<const float*>(obuf), e1 - e0);
        if (Op::kWritesNoise && io.draw) stream_copy(reinterpret_cast<float*>(io.noise_out) + e0, zbuf, e1 - e0);
      }
    }
    if (stream) stream_fence();
  });
}

}  // namespace cpu
}  // namespace diffkern

namespace diffkern {
namespace cpu {

// Tensors -> StepIO, dtype dispatch, run. `noise_out` is written when the op draws and
// reports its noise (q_sample).
template <class Op>
at::Tensor run_step(const Op& op, const at::Tensor& x, const at::Tensor* m, const std::optional<at::Tensor>& noise,
                    bool draw, PhiloxKey key, bool per_sample, at::Tensor* noise_out = nullptr) {
  TORCH_CHECK(x.device().is_cpu(), "expected CPU tensors");
  at::Tensor out = empty_output(x.sizes(), x.options());
  const int64_t numel = out.numel();
  const int64_t inner = numel == 0 ? 1 : numel / batch_of(out);
  StepIO io;
  io.x = make_operand(x, out.sizes());
  if (m) {
    check_same(x, *m, "model output");
    io.m = make_operand(*m, out.sizes());
    io.has_m = true;
  }
  if (noise.has_value()) {
    check_same(x, *noise, "noise");
    io.noise = make_operand(*noise, out.sizes());
    io.has_noise = true;
  }
  io.draw = draw && !io.has_noise;
  io.key = key;
  io.out = out.data_ptr();
  if (noise_out && io.draw) {
    *noise_out = empty_output(out.sizes(), out.options());
    io.noise_out = noise_out->data_ptr();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffkern_cpu_step", [&] {
    run_elementwise<scalar_t>(op, io, numel, inner, per_sample);
  });
  return out;
}

}  // namespace cpu
}  // namespace diffkern
