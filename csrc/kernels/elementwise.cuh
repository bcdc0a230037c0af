// The CUDA driver of every elementwise step op. One thread handles 8 consecutive logical
// elements per iteration: two Philox groups of noise, 16-byte loads and stores when the
// operands are contiguous and aligned, a strided scalar path otherwise. Grid-stride over
// a grid sized to the device, so any size runs with one launch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"
#include "philox.h"

namespace diffkern {
namespace cuda {

constexpr int kUnit = 8;  // elements per thread per iteration
constexpr int kThreads = 256;

template <class T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <class C, class T>
__device__ __forceinline__ C to_c(T v) { return static_cast<C>(v); }
template <>
__device__ __forceinline__ float to_c<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_c<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T, class C>
__device__ __forceinline__ T from_c(C v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_c<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_c<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ PhiloxKey resolve_key(const RngArgs& r) {
  if (r.captured) return PhiloxKey{uint64_t(*r.seed_ptr), uint64_t(*r.offset_ptr) + r.offset_intragraph};
  return PhiloxKey{r.seed, r.offset};
}

// The step of per-sample keys: from device memory when the binding left it there (a
// captured graph replays whatever its buffer holds).
__device__ __forceinline__ uint64_t keyed_step(const KeyedArgs& k) {
  return k.seeds && k.step_ptr ? uint64_t(*k.step_ptr) : k.step;
}

// Unit u's kUnit normals (elements e0 = u * kUnit ...): groups 2u and 2u + 1 of the call's
// Philox stream, or under per-sample keys element j of sample b's stream (a whole group
// where four elements share a sample on a group boundary, else one element at a time).
__device__ __forceinline__ void draw_unit(const KeyedArgs& k, uint64_t kstep, PhiloxKey key, int64_t u, int64_t e0,
                                          int64_t numel, float* z) {
  if (!k.seeds) {
    const Float4 lo = philox_normal4(key, uint64_t(u) * 2), hi = philox_normal4(key, uint64_t(u) * 2 + 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[i] = lo.v[i];
      z[i + 4] = hi.v[i];
    }
    return;
  }
#pragma unroll
  for (int h = 0; h < kUnit / 4; ++h) {
    const int64_t e = e0 + 4 * h;
    if (e >= numel) break;  // past the last sample: no seed to read
    const int64_t b = e / k.inner, j = e - b * k.inner;
    if ((j & 3) == 0 && j + 4 <= k.inner) {
      const Float4 q = philox_normal4(keyed_key(k.seed_of(b), kstep), kKeyedGroup + uint64_t(j >> 2));
#pragma unroll
      for (int i = 0; i < 4; ++i) z[4 * h + i] = q.v[i];
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t ei = e + i;
        if (ei < numel) {
          const int64_t bi = ei / k.inner;
          z[4 * h + i] = keyed_normal_at(k.seed_of(bi), kstep, uint64_t(ei - bi * k.inner));
        }
      }
    }
  }
}

template <class T>
__device__ __forceinline__ T load_at(const Operand& o, int64_t i) {
  const T* p = static_cast<const T*>(o.data);
  return o.contiguous ? p[i] : p[o.ix.offset(i)];
}

// kUnit elements from / to a 16-byte aligned address, converted to / from the math type.
// Built from 16-byte register loads and bit operations (no local arrays that are
// reinterpreted, which would put them in local memory).
template <class C, class T>
struct Unit;

template <class C>
struct Unit<C, float> {
  static __device__ __forceinline__ void load(const void* base, int64_t e0, C* v) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + e0);
    const float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void store(void* base, int64_t e0, const C* v) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + e0);
    p[0] = make_float4(v[0], v[1], v[2], v[3]);
    p[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <class C>
struct Unit<C, double> {
  static __device__ __forceinline__ void load(const void* base, int64_t e0, C* v) {
    const double2* p = reinterpret_cast<const double2*>(static_cast<const double*>(base) + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const double2 a = p[i];
      v[2 * i] = a.x;
      v[2 * i + 1] = a.y;
    }
  }
  static __device__ __forceinline__ void store(void* base, int64_t e0, const C* v) {
    double2* p = reinterpret_cast<double2*>(static_cast<double*>(base) + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = make_double2(v[2 * i], v[2 * i + 1]);
  }
};

// 16-bit types: eight values in one uint4, two per 32-bit word, low half first.
template <class T>
struct Bits16;
template <>
struct Bits16<__half> {
  static __device__ __forceinline__ float to_float(uint32_t b) { return __half2float(__ushort_as_half((unsigned short)b)); }
  static __device__ __forceinline__ uint32_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <>
struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)b));
  }
  static __device__ __forceinline__ uint32_t from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <class T>
struct Unit16 {
  static __device__ __forceinline__ void load(const void* base, int64_t e0, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(base) + e0);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Bits16<T>::to_float(w[i] & 0xFFFFu);
      v[2 * i + 1] = Bits16<T>::to_float(w[i] >> 16);
    }
  }
  static __device__ __forceinline__ void store(void* base, int64_t e0, const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = Bits16<T>::from_float(v[2 * i]) | (Bits16<T>::from_float(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(static_cast<T*>(base) + e0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <>
struct Unit<float, __half> : Unit16<__half> {};
template <>
struct Unit<float, __nv_bfloat16> : Unit16<__nv_bfloat16> {};

// A step op's coefficients as the CPU driver forms them: in double, then rounded to the
// compute type, so a CUDA step equals the CPU one bit for bit (the emulation tests check
// it). Formed once per 8-element unit, never per element; out of line so the double
// arithmetic stays out of the unrolled loop's registers.
template <class C, class Op>
__device__ __noinline__ StepCoeffs<C> step_coeffs(const Op& op, int64_t b) {
  return cast_coeffs<C>(op.template coeffs<double>(b));
}

template <class T, class Op>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepLaunch p, const Op op) {
  using C = typename Compute<T>::type;
  const PhiloxKey key = resolve_key(p.rng);
  const uint64_t kstep = keyed_step(p.keyed);
  const int64_t nunits = (p.numel + kUnit - 1) / kUnit;
  const StepCoeffs<C> shared = step_coeffs<C>(op, 0);
  const bool has_z = p.draw || p.has_noise;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < nunits; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = u * kUnit;
    float z[kUnit] = {};
    if (p.draw) draw_unit(p.keyed, kstep, key, u, e0, p.numel, z);
    const int64_t n = p.numel - e0 < kUnit ? p.numel - e0 : kUnit;
    const int64_t q0 = e0 / p.levels.run;
    const bool one_sample = !p.levels.varies || (e0 + n - 1) / p.levels.run == q0;
    StepCoeffs<C> k = p.levels.varies ? step_coeffs<C>(op, p.levels.of_run(q0)) : shared;
    // The vector path needs one coefficient set for the unit; units that straddle two
    // level runs (tiny per-sample sizes, per-token levels) take the scalar path, which keeps the per-element
    // coefficient code out of the unrolled loop (and its registers).
    if (p.vectorized && n == kUnit && one_sample) {
      C xs[kUnit], ms[kUnit], ns[kUnit];
      Unit<C, T>::load(p.x.data, e0, xs);
      if (Op::kHasModel) Unit<C, T>::load(p.m.data, e0, ms);
      if (p.has_noise) Unit<C, T>::load(p.noise.data, e0, ns);
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        const C zi = p.draw ? C(z[i]) : (p.has_noise ? ns[i] : C(0));
        xs[i] = op.apply(k, xs[i], Op::kHasModel ? ms[i] : C(0), zi, has_z);
      }
      Unit<C, T>::store(p.out, e0, xs);
      if (Op::kWritesNoise && p.draw) {
#pragma unroll
        for (int i = 0; i < kUnit; ++i) ns[i] = C(z[i]);
        Unit<C, T>::store(p.noise_out, e0, ns);
      }
    } else {
#pragma unroll 1
      for (int i = 0; i < n; ++i) {
        const int64_t e = e0 + i;
        const StepCoeffs<C> ki = one_sample ? k : step_coeffs<C>(op, p.levels.index(e));
        float zd = z[0];  // z[i] by selects: a runtime index would move z to local memory
#pragma unroll
        for (int j = 1; j < kUnit; ++j) zd = i == j ? z[j] : zd;
        const C zi = p.draw ? C(zd) : (p.has_noise ? to_c<C>(load_at<T>(p.noise, e)) : C(0));
        const C mi = Op::kHasModel ? to_c<C>(load_at<T>(p.m, e)) : C(0);
        static_cast<T*>(p.out)[e] = from_c<T>(op.apply(ki, to_c<C>(load_at<T>(p.x, e)), mi, zi, has_z));
        if (Op::kWritesNoise && p.draw) static_cast<T*>(p.noise_out)[e] = from_c<T>(zi);
      }
    }
  }
}

int grid_for(int64_t work_items, int device);

template <class Op>
void launch_elementwise(const StepLaunch& p, const Op& op, cudaStream_t stream) {
  if (p.numel == 0) return;
  const int64_t nunits = (p.numel + kUnit - 1) / kUnit;
  const int grid = grid_for(nunits, p.device);
  switch (p.dtype) {
    case DType::kFloat32: DK_LAUNCH((step_kernel<float, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat16: DK_LAUNCH((step_kernel<__half, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kBFloat16: DK_LAUNCH((step_kernel<__nv_bfloat16, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat64: DK_LAUNCH((step_kernel<double, Op>), grid, kThreads, 0, stream, p, op); break;
  }
}

// The sampler-family ops' driver (sampler_ops.h interface): the same geometry as
// step_kernel, with up to six inputs and three outputs (LinearOp; the fixed-arity ops up to
// four and two). Coefficients are formed in double
// per unit (once per thread when they do not depend on the sample) and rounded to C.
// Out of line: the double-precision coefficients (logs, expm1) inlined twice into the
// unrolled loop spilled registers.
template <class K, class Op>
__device__ __noinline__ K sampler_coeffs(const Op& op, int64_t b) {
  return K::from(op.template coeffs<double>(b));
}

template <class T, class Op>
__global__ void __launch_bounds__(kThreads) sampler_kernel(const SamplerLaunch p, const Op op) {
  using C = typename Compute<T>::type;
  using K = typename Op::template Coeffs<C>;
  const PhiloxKey key = resolve_key(p.rng);
  const uint64_t kstep = keyed_step(p.keyed);
  const int64_t nunits = (p.numel + kUnit - 1) / kUnit;
  constexpr int kIn = Op::kInputs, kOut = Op::kOutputs > 2 ? Op::kOutputs : 2;
  const K shared = sampler_coeffs<K>(op, 0);
  const bool has_z = p.draw || p.has_noise;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < nunits; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = u * kUnit;
    float z[kUnit] = {};
    if (p.draw) draw_unit(p.keyed, kstep, key, u, e0, p.numel, z);
    const int64_t n = p.numel - e0 < kUnit ? p.numel - e0 : kUnit;
    const int64_t q0 = e0 / p.levels.run;
    const bool one_sample = !p.levels.varies || (e0 + n - 1) / p.levels.run == q0;
    const K k = p.levels.varies ? sampler_coeffs<K>(op, p.levels.of_run(q0)) : shared;
    if (p.vectorized && n == kUnit && one_sample) {
      C a[kIn][kUnit], ns[kUnit], r[kOut][kUnit];
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        ns[i] = C(0);
#pragma unroll
        for (int j = 1; j < kIn; ++j) a[j][i] = C(0);
      }
      Unit<C, T>::load(p.in[0].data, e0, a[0]);
#pragma unroll
      for (int j = 1; j < kIn; ++j)
        if (p.nin > j) Unit<C, T>::load(p.in[j].data, e0, a[j]);
      if (p.has_noise) Unit<C, T>::load(p.noise.data, e0, ns);
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        const C zi = p.draw ? C(z[i]) : ns[i];
        C ai[kIn], ri[kOut];
#pragma unroll
        for (int j = 0; j < kIn; ++j) ai[j] = a[j][i];
#pragma unroll
        for (int o = 0; o < kOut; ++o) ri[o] = C(0);
        if (has_z)
          apply_op<true, kIn, kOut>(op, k, ai, zi, ri);
        else
          apply_op<false, kIn, kOut>(op, k, ai, zi, ri);
        if (Op::kWritesNoise) ri[1] = zi;
#pragma unroll
        for (int o = 0; o < kOut; ++o) r[o][i] = ri[o];
      }
      Unit<C, T>::store(p.out[0], e0, r[0]);
#pragma unroll
      for (int o = 1; o < kOut; ++o)
        if (p.out[o]) Unit<C, T>::store(p.out[o], e0, r[o]);
    } else {
#pragma unroll 1
      for (int i = 0; i < n; ++i) {
        const int64_t e = e0 + i;
        const K ki = one_sample ? k : sampler_coeffs<K>(op, p.levels.index(e));
        float zd = z[0];  // z[i] by selects: a runtime index would move z to local memory
#pragma unroll
        for (int j = 1; j < kUnit; ++j) zd = i == j ? z[j] : zd;
        const C zi = p.draw ? C(zd) : (p.has_noise ? to_c<C>(load_at<T>(p.noise, e)) : C(0));
        C v[kIn], o[kOut];
#pragma unroll
        for (int j = 0; j < kIn; ++j) v[j] = p.nin > j ? to_c<C>(load_at<T>(p.in[j], e)) : C(0);
#pragma unroll
        for (int j = 0; j < kOut; ++j) o[j] = C(0);
        if (has_z)
          apply_op<true, kIn, kOut>(op, ki, v, zi, o);
        else
          apply_op<false, kIn, kOut>(op, ki, v, zi, o);
        static_cast<T*>(p.out[0])[e] = from_c<T>(o[0]);
#pragma unroll
        for (int j = 1; j < kOut; ++j)
          if (p.out[j]) static_cast<T*>(p.out[j])[e] = from_c<T>(Op::kWritesNoise && j == 1 ? zi : o[j]);
      }
    }
  }
}

template <class Op>
void launch_sampler(const SamplerLaunch& p, const Op& op, cudaStream_t stream) {
  if (p.numel == 0) return;
  const int64_t nunits = (p.numel + kUnit - 1) / kUnit;
  const int grid = grid_for(nunits, p.device);
  switch (p.dtype) {
    case DType::kFloat32: DK_LAUNCH((sampler_kernel<float, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat16: DK_LAUNCH((sampler_kernel<__half, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kBFloat16: DK_LAUNCH((sampler_kernel<__nv_bfloat16, Op>), grid, kThreads, 0, stream, p, op); break;
    case DType::kFloat64: DK_LAUNCH((sampler_kernel<double, Op>), grid, kThreads, 0, stream, p, op); break;
  }
}

}  // namespace cuda
}  // namespace diffkern
