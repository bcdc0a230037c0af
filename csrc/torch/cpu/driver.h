// The CPU driver of every elementwise step op: chunks of the logical index range over
// at::parallel_for, in-kernel normals drawn a chunk at a time into an L1-resident buffer
// (a vectorizable loop over Philox groups), then the op's update over the chunk.
// The update and the noise are the shared functions of csrc/kernels.
//
// No tensors here (elementwise.h turns tensors into a StepIO): only at::parallel_for and
// c10's 16-bit types, so the CUDA emulation tests (tests/native/cuda_emu_tests.cpp) compile
// this driver beside the emulated kernels and hold the two equal bit for bit.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "../../kernels/philox_simd.h"
#include "../../kernels/ops.h"

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

// Where the step's noise comes from: none, drawn into the chunk's buffer, or given.
enum class ZMode { kNone, kDrawn, kGiven };

// The contiguous loop over [i0, i1) of one sample. Every pointer addresses the chunk's
// first element (a tensor's data + e0, or an L1 buffer), so indices are chunk-relative.
// N inputs are read and NO outputs written; for kWritesNoise ops out[1] gets the noise.
// Scalars and separate pointers, not arrays: GCC does not vectorize the loop when the
// operands go through local arrays (measured: a DDIM step 7x slower).
template <int N, int NO, ZMode Z, class TI, class TO, class C, class Op>
inline void fast_span(const Op& op, const typename Op::template Coeffs<C>& k, const TI* const* in, const TI* np,
                      const float* z, TO* const* out, int64_t i0, int64_t i1) {
  constexpr bool kZ = Z != ZMode::kNone;
  // absent operands alias in[0] / out[0] and are never read or written
  const TI *p0 = in[0], *p1 = N > 1 ? in[1] : in[0], *p2 = N > 2 ? in[2] : in[0], *p3 = N > 3 ? in[3] : in[0];
  const TI *p4 = N > 4 ? in[4] : in[0], *p5 = N > 5 ? in[5] : in[0];
  TO *o0 = out[0], *o1 = NO > 1 ? out[1] : out[0], *o2 = NO > 2 ? out[2] : out[0];
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const C zi = Z == ZMode::kDrawn ? C(z[i]) : (Z == ZMode::kGiven ? C(np[i]) : C(0));
    const C a0 = C(p0[i]), a1 = N > 1 ? C(p1[i]) : C(0), a2 = N > 2 ? C(p2[i]) : C(0), a3 = N > 3 ? C(p3[i]) : C(0);
    C r0, r1 = C(0), r2 = C(0);
    if constexpr (HasArrayApply<Op>::value) {
      const C a4 = N > 4 ? C(p4[i]) : C(0), a5 = N > 5 ? C(p5[i]) : C(0);
      op.template apply_n<kZ, N, NO, C>(k, a0, a1, a2, a3, a4, a5, zi, r0, r1, r2);
    } else {
      op.template apply<kZ, C>(k, a0, a1, a2, a3, zi, r0, r1);
    }
    o0[i] = TO(r0);
    if (NO > 1) o1[i] = TO(Op::kWritesNoise ? zi : r1);
    if (NO > 2) o2[i] = TO(r2);
  }
}

template <class T>
inline const T& at_(const OperandView& o, int64_t i) {
  const T* p = static_cast<const T*>(o.data);
  return o.contiguous ? p[i] : p[o.ix.offset(i)];
}

constexpr int kMaxIn = kMaxLinearInputs, kMaxOut = kMaxLinearOutputs;

// An operand's storage when it is not the loop's T: a mixed-dtype call (a float16 model
// output beside float32 latents) loads each operand in its own dtype, a chunk at a time
// into an L1 buffer of T, instead of a cast copy of the whole tensor first. T is then the
// promoted dtype, float or double; such operands are contiguous (elementwise.h casts the
// rest).
enum class Storage : uint8_t { kSame, kHalf, kBFloat16, kFloat, kDouble };

// dst[0, n) = src[e0, e0 + n) as C, from storage S (16-bit types through float).
template <class S, class C>
inline void load_from(const void* src, int64_t e0, C* dst, int64_t n) {
  const S* p = static_cast<const S*>(src) + e0;
  if constexpr (std::is_same<C, float>::value && IsHalf<S>::value) {
    widen(p, dst, n);
  } else if constexpr (IsHalf<S>::value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = C(float(p[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = C(p[i]);
  }
}

// The same from storage s (C float or double; double storage only into double, as a
// double operand promotes T to double).
template <class C>
inline void load_as(const void* src, Storage s, int64_t e0, C* dst, int64_t n) {
  switch (s) {
    case Storage::kHalf: load_from<c10::Half>(src, e0, dst, n); break;
    case Storage::kBFloat16: load_from<c10::BFloat16>(src, e0, dst, n); break;
    case Storage::kFloat: load_from<float>(src, e0, dst, n); break;
    case Storage::kDouble: load_from<double>(src, e0, dst, n); break;
    case Storage::kSame: break;
  }
}

struct StepIO {
  OperandView in[kMaxIn];  // in[0] = x; a fixed-arity op may leave its last input absent (nin = kInputs - 1)
  int nin = 0;
  Storage in_storage[kMaxIn] = {};  // kSame: T
  Storage noise_storage = Storage::kSame;
  OperandView noise;
  bool has_noise = false, draw = false;
  // out[1]: the op's second value or the noise used; out[2]: a third value; null: not written
  void* out[kMaxOut] = {nullptr, nullptr, nullptr};
  PhiloxKey key{0, 0};
  KeyedArgs keyed;  // seeds set: the drawn noise is keyed per sample, not by `key`
};

// f(integral_constant<N>) for the number of inputs present: any of 1..kInputs for
// LinearOp (its callers pass only the inputs they combine), else Op::kInputs or one fewer.
template <class Op, class F>
inline void with_inputs(int nin, F&& f) {
  if constexpr (HasArrayApply<Op>::value) {
    switch (nin) {
      case 1: f(std::integral_constant<int, 1>{}); break;
      case 2: f(std::integral_constant<int, 2>{}); break;
      case 3: f(std::integral_constant<int, 3>{}); break;
      case 4: f(std::integral_constant<int, 4>{}); break;
      case 5: f(std::integral_constant<int, 5>{}); break;
      default: f(std::integral_constant<int, 6>{}); break;
    }
  } else {
    constexpr int kAll = Op::kInputs, kFewer = Op::kInputs > 1 ? Op::kInputs - 1 : 1;
    if (nin == kAll)
      f(std::integral_constant<int, kAll>{});
    else
      f(std::integral_constant<int, kFewer>{});
  }
}

// f(integral_constant<NO>) for the number of outputs the loop writes (1..3).
template <class Op, class F>
inline void with_outputs(int nout, F&& f) {
  if (nout <= 1)
    f(std::integral_constant<int, 1>{});
  else if (Op::kOutputs <= 2 || nout == 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, (Op::kOutputs > 2 ? 3 : 2)>{});
}

template <class F>
inline void with_zmode(bool draw, bool given, F&& f) {
  if (draw)
    f(std::integral_constant<ZMode, ZMode::kDrawn>{});
  else if (given)
    f(std::integral_constant<ZMode, ZMode::kGiven>{});
  else
    f(std::integral_constant<ZMode, ZMode::kNone>{});
}

// Runs `op` over all elements. Math type C: double for double storage, float otherwise;
// coefficients are formed in double where the level index changes (once per call for
// scalar levels) and rounded to C.
template <class T, class Op>
void run_elementwise(const Op& op, const StepIO& io, int64_t numel, const LevelMap& levels) {
  using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  using K = typename Op::template Coeffs<C>;
  if (numel == 0) return;
  constexpr bool kFloat = std::is_same<T, float>::value;
  constexpr int kOut = Op::kOutputs > 2 ? Op::kOutputs : 2;  // output slots (kWritesNoise ops: 2)
  const K shared = K::from(op.template coeffs<double>(0));
  const int64_t run = levels.varies ? levels.run : numel;  // scalar levels: one run
  bool fast = !io.has_noise || io.noise.contiguous;
  for (int j = 0; j < io.nin; ++j) fast = fast && io.in[j].contiguous;
  // operands stored in another dtype than T (contiguous: elementwise.h casts the others)
  bool mixed = io.has_noise && io.noise_storage != Storage::kSame;
  for (int j = 0; j < io.nin; ++j) mixed = mixed || io.in_storage[j] != Storage::kSame;
  constexpr bool kWide = std::is_same<T, float>::value || std::is_same<T, double>::value;
  mixed = kWide && mixed && fast;
  int nalloc = 0;  // outputs allocated: out[0..nalloc)
  while (nalloc < kOut && io.out[nalloc] != nullptr) ++nalloc;
  bool aligned = true;
  for (int j = 0; j < nalloc; ++j) aligned = aligned && reinterpret_cast<uintptr_t>(io.out[j]) % 64 == 0;
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  // Streaming: float outputs written in the contiguous fast path, staged a chunk at a time
  // in L1 (chunks start 8 KiB apart, so aligned whenever the output is).
  const bool stream = kFloat && fast && numel * int64_t(sizeof(T)) >= kStreamBytes && aligned;
  // Staged: fp16/bf16 in the fast path, widened to float a chunk at a time in L1 buffers.
  const bool staged = IsHalf<T>::value && fast;
  // Outputs the loop writes. The second output of a kWritesNoise op is the drawn noise:
  // streamed or narrowed from the noise buffer when those paths run, written by the loop
  // otherwise.
  const int nloop = Op::kWritesNoise ? (nalloc == 2 && io.draw && !stream && !staged ? 2 : 1)
                                     : (nalloc > 0 ? nalloc : 1);
  constexpr int64_t kStage = IsHalf<T>::kStage, kStreamBuf = kFloat ? kChunk : 1, kMixBuf = kWide ? kChunk : 1;
  at::parallel_for(0, nchunks, 16, [&](int64_t cbeg, int64_t cend) {
    alignas(64) float zbuf[kChunk];
    alignas(64) T obuf[kOut][kStreamBuf];
    alignas(64) float fin[Op::kInputs][kStage], fn[kStage], fo[kOut][kStage];
    alignas(64) T mbuf[Op::kInputs + 1][kMixBuf];  // mixed operands in T (the last: noise)
    int64_t cached = 0;
    K k = shared;
    // Chunks exist for the L1 buffers; without them a thread's whole range is one span.
    const int64_t eend = std::min(numel, cend * kChunk);
    const int64_t span = (io.draw || stream || staged || mixed) ? kChunk : eend;
    for (int64_t e0 = cbeg * kChunk; e0 < eend; e0 += span) {
      const int64_t e1 = std::min(eend, e0 + span), n = e1 - e0;
      T* dst[kOut] = {};
      T* out[kOut] = {};
      float* fout[kOut] = {};
      for (int j = 0; j < nalloc; ++j) {
        dst[j] = static_cast<T*>(io.out[j]) + e0;
        out[j] = stream ? obuf[j] : dst[j];
        fout[j] = fo[j];
      }
      if (io.draw) {
        if (io.keyed.seeds)
          simd::fill_keyed_normals(io.keyed.seeds, io.keyed.nseeds, io.keyed.step, io.keyed.inner, e0, n, zbuf);
        else
          simd::fill_normals(io.key, uint64_t(e0 / 4), (n + 3) / 4, zbuf);
      }
      const T* in[kMaxIn] = {};
      const float* fin_p[kMaxIn] = {};
      for (int j = 0; j < io.nin; ++j) {
        in[j] = fast ? static_cast<const T*>(io.in[j].data) + e0 : nullptr;
        if constexpr (kWide) {
          if (mixed && io.in_storage[j] != Storage::kSame) {
            load_as<T>(io.in[j].data, io.in_storage[j], e0, mbuf[j], n);
            in[j] = mbuf[j];
          }
        }
        if constexpr (IsHalf<T>::value) {
          if (staged) {
            widen(in[j], fin[j], n);
            fin_p[j] = fin[j];
          }
        }
      }
      const T* np = fast && io.has_noise ? static_cast<const T*>(io.noise.data) + e0 : nullptr;
      if constexpr (kWide) {
        if (mixed && io.has_noise && io.noise_storage != Storage::kSame) {
          load_as<T>(io.noise.data, io.noise_storage, e0, mbuf[Op::kInputs], n);
          np = mbuf[Op::kInputs];
        }
      }
      if constexpr (IsHalf<T>::value) {
        if (staged && io.has_noise) widen(np, fn, n);
      }
      for (int64_t e = e0; e < e1;) {
        const int64_t q = e / run;
        int64_t r1 = std::min(e1, (q + 1) * run);
        if (levels.varies) {
          const int64_t li = levels.of_run(q);
          if (li != cached) {
            // a new index with the same values (a frame's value over its tokens) keeps them
            if (!op.same_levels(li, cached)) k = K::from(op.template coeffs<double>(li));
            cached = li;
          }
          // The runs after it with the same values join its span: per-token levels that
          // repeat a frame's value then loop over the frame, not over C channels at a time.
          for (int64_t qn = q + 1; r1 < e1 && op.same_levels(levels.of_run(qn), li); ++qn)
            r1 = std::min(e1, (qn + 1) * run);
        }
        const int64_t i0 = e - e0, i1 = r1 - e0;
        if (staged || fast) {
          // staged: the op's own outputs go to the float buffers (a kWritesNoise op's
          // noise is narrowed from zbuf below)
          const int nl = staged ? (Op::kWritesNoise ? 1 : nloop) : nloop;
          with_inputs<Op>(io.nin, [&](auto nc) {
            with_zmode(io.draw, io.has_noise, [&](auto zc) {
              with_outputs<Op>(nl, [&](auto oc) {
                constexpr int N = decltype(nc)::value, NO = decltype(oc)::value;
                constexpr ZMode Z = decltype(zc)::value;
                if (staged)
                  fast_span<N, NO, Z, float, float, C>(op, k, fin_p, fn, zbuf, fout, i0, i1);
                else
                  fast_span<N, NO, Z, T, T, C>(op, k, in, np, zbuf, out, i0, i1);
              });
            });
          });
        } else {
          const bool has_z = io.draw || io.has_noise;
          for (int64_t i = e; i < r1; ++i) {
            const C zi = io.draw ? C(zbuf[i - e0]) : (io.has_noise ? C(at_<T>(io.noise, i)) : C(0));
            C a[kMaxIn] = {};
            for (int j = 0; j < io.nin; ++j) a[j] = C(at_<T>(io.in[j], i));
            C r[kMaxOut] = {};
            if (has_z)
              apply_op<true, Op::kInputs, kOut>(op, k, a, zi, r);
            else
              apply_op<false, Op::kInputs, kOut>(op, k, a, zi, r);
            for (int j = 0; j < nalloc; ++j) out[j][i - e0] = T(Op::kWritesNoise && j == 1 ? zi : r[j]);
          }
        }
        e = r1;
      }
      if constexpr (IsHalf<T>::value) {
        if (staged) {
          for (int j = 0; j < nalloc; ++j) narrow(Op::kWritesNoise && j == 1 ? zbuf : fo[j], dst[j], n);
        }
      }
      if (stream) {
        for (int j = 0; j < nalloc; ++j)
          stream_copy(reinterpret_cast<float*>(dst[j]),
                      Op::kWritesNoise && j == 1 ? zbuf : reinterpret_cast<const float*>(obuf[j]), n);
      }
    }
    if (stream) stream_fence();
  });
}

}  // namespace cpu
}  // namespace diffkern
