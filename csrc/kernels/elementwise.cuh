// The CUDA driver of every elementwise op. One thread handles 8 consecutive logical
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

// C is float, or double for a 16-bit operand of a float64 step (mixed dtypes); stores
// only ever come from float (a 16-bit output means a float computation).
template <class C, class T>
struct Unit16 {
  static __device__ __forceinline__ void load(const void* base, int64_t e0, C* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(base) + e0);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = C(Bits16<T>::to_float(w[i] & 0xFFFFu));
      v[2 * i + 1] = C(Bits16<T>::to_float(w[i] >> 16));
    }
  }
  static __device__ __forceinline__ void store(void* base, int64_t e0, const float* v) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = Bits16<T>::from_float(v[2 * i]) | (Bits16<T>::from_float(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(static_cast<T*>(base) + e0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <class C>
struct Unit<C, __half> : Unit16<C, __half> {};
template <class C>
struct Unit<C, __nv_bfloat16> : Unit16<C, __nv_bfloat16> {};

// An operand's kUnit values (load_unit) or one value (load_one) as C. `mixed` false:
// every operand is stored as the kernel's T. Else this one is stored in `s`: a mixed-dtype call (a bfloat16
// model output beside float32 latents) reads each operand as it is, with no cast pass
// first; the promotion that chose T means s is never wider than T. The switch is uniform
// across a warp.
template <class C, class T>
__device__ __forceinline__ void load_unit(const Operand& o, bool mixed, DType s, int64_t e0, C* v) {
  if (!mixed) return Unit<C, T>::load(o.data, e0, v);
  switch (s) {
    case DType::kFloat32: Unit<C, float>::load(o.data, e0, v); break;
    case DType::kFloat16: Unit<C, __half>::load(o.data, e0, v); break;
    case DType::kBFloat16: Unit<C, __nv_bfloat16>::load(o.data, e0, v); break;
    case DType::kFloat64:
      if constexpr (sizeof(C) == 8) Unit<C, double>::load(o.data, e0, v);
      break;
  }
}

template <class C, class T>
__device__ __forceinline__ C load_one(const Operand& o, bool mixed, DType s, int64_t i) {
  if (!mixed) return to_c<C>(load_at<T>(o, i));
  switch (s) {
    case DType::kFloat16: return C(to_c<float>(load_at<__half>(o, i)));
    case DType::kBFloat16: return C(to_c<float>(load_at<__nv_bfloat16>(o, i)));
    case DType::kFloat64: return C(load_at<double>(o, i));
    default: return C(load_at<float>(o, i));
  }
}

int grid_for(int64_t work_items, int device);

// The driver of every elementwise op (the op_base.h interface; the older step ops
// through SampleStep, as on the CPU): up to six inputs and three outputs (LinearOp; the
// fixed-arity ops up to four and two). Coefficients are formed in double
// per unit (once per thread when they do not depend on the sample) and rounded to C.
// Out of line: the double-precision coefficients (logs, expm1) inlined twice into the
// unrolled loop spilled registers.
template <class K, class Op>
__device__ __noinline__ K sampler_coeffs(const Op& op, int64_t b) {
  return K::from(op.template coeffs<double>(b));
}

// kMixed: some operand is stored in another dtype (p.mixed). A kernel of its own: the
// per-operand dtype switch inside the unrolled unit cost the plain kernel its registers
// (fp32 Euler spilled 180 bytes with it, 4 without).
template <class T, class Op, bool kMixed>
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
      load_unit<C, T>(p.in[0], kMixed, p.in_dtype[0], e0, a[0]);
#pragma unroll
      for (int j = 1; j < kIn; ++j)
        if (p.nin > j) load_unit<C, T>(p.in[j], kMixed, p.in_dtype[j], e0, a[j]);
      if (p.has_noise) load_unit<C, T>(p.noise, kMixed, p.noise_dtype, e0, ns);
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
        const C zi = p.draw ? C(zd) : (p.has_noise ? load_one<C, T>(p.noise, kMixed, p.noise_dtype, e) : C(0));
        C v[kIn], o[kOut];
#pragma unroll
        for (int j = 0; j < kIn; ++j) v[j] = p.nin > j ? load_one<C, T>(p.in[j], kMixed, p.in_dtype[j], e) : C(0);
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
  // Mixed operands promote to float or double: 16-bit kernels never read another dtype.
  switch (p.dtype) {
    case DType::kFloat32:
      if (p.mixed)
        DK_LAUNCH((sampler_kernel<float, Op, true>), grid, kThreads, 0, stream, p, op);
      else
        DK_LAUNCH((sampler_kernel<float, Op, false>), grid, kThreads, 0, stream, p, op);
      break;
    case DType::kFloat16: DK_LAUNCH((sampler_kernel<__half, Op, false>), grid, kThreads, 0, stream, p, op); break;
    case DType::kBFloat16:
      DK_LAUNCH((sampler_kernel<__nv_bfloat16, Op, false>), grid, kThreads, 0, stream, p, op);
      break;
    case DType::kFloat64:
      if (p.mixed)
        DK_LAUNCH((sampler_kernel<double, Op, true>), grid, kThreads, 0, stream, p, op);
      else
        DK_LAUNCH((sampler_kernel<double, Op, false>), grid, kThreads, 0, stream, p, op);
      break;
  }
}

}  // namespace cuda
}  // namespace diffkern
