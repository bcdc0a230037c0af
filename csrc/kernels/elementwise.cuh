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

template <class T>
__device__ __forceinline__ T load_at(const Operand& o, int64_t i) {
  const T* p = static_cast<const T*>(o.data);
  return o.contiguous ? p[i] : p[o.ix.offset(i)];
}

// kUnit elements starting at a 16-byte aligned address.
template <class T>
__device__ __forceinline__ void load_unit(const void* base, int64_t e0, T* dst) {
  constexpr int kVecs = kUnit * int(sizeof(T)) / 16;
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(base) + e0);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) d[i] = src[i];
}

template <class T>
__device__ __forceinline__ void store_unit(void* base, int64_t e0, const T* src) {
  constexpr int kVecs = kUnit * int(sizeof(T)) / 16;
  uint4* dst = reinterpret_cast<uint4*>(static_cast<T*>(base) + e0);
  const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) dst[i] = s[i];
}

template <class T, class Op>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepLaunch p, const Op op) {
  using C = typename Compute<T>::type;
  const PhiloxKey key = resolve_key(p.rng);
  const int64_t nunits = (p.numel + kUnit - 1) / kUnit;
  const StepCoeffs<C> shared = op.template coeffs<C>(0);
  const bool has_z = p.draw || p.has_noise;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < nunits; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = u * kUnit;
    float z[kUnit];
    if (p.draw) {
      const Float4 lo = philox_normal4(key, uint64_t(u) * 2), hi = philox_normal4(key, uint64_t(u) * 2 + 1);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        z[i] = lo.v[i];
        z[i + 4] = hi.v[i];
      }
    }
    const int64_t n = p.numel - e0 < kUnit ? p.numel - e0 : kUnit;
    const int64_t b0 = e0 / p.inner;
    const bool one_sample = !p.per_sample || (e0 + n - 1) / p.inner == b0;
    StepCoeffs<C> k = p.per_sample ? op.template coeffs<C>(b0) : shared;
    if (p.vectorized && n == kUnit) {
      alignas(16) T xs[kUnit], ms[kUnit], ns[kUnit], os[kUnit];
      load_unit<T>(p.x.data, e0, xs);
      if (Op::kHasModel) load_unit<T>(p.m.data, e0, ms);
      if (p.has_noise) load_unit<T>(p.noise.data, e0, ns);
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        const StepCoeffs<C> ki = one_sample ? k : op.template coeffs<C>((e0 + i) / p.inner);
        const C zi = p.draw ? C(z[i]) : (p.has_noise ? to_c<C>(ns[i]) : C(0));
        os[i] = from_c<T>(op.apply(ki, to_c<C>(xs[i]), Op::kHasModel ? to_c<C>(ms[i]) : C(0), zi, has_z));
      }
      store_unit<T>(p.out, e0, os);
      if (Op::kWritesNoise && p.draw) {
#pragma unroll
        for (int i = 0; i < kUnit; ++i) ns[i] = from_c<T>(C(z[i]));
        store_unit<T>(p.noise_out, e0, ns);
      }
    } else {
      for (int i = 0; i < n; ++i) {
        const int64_t e = e0 + i;
        const StepCoeffs<C> ki = one_sample ? k : op.template coeffs<C>(e / p.inner);
        const C zi = p.draw ? C(z[i]) : (p.has_noise ? to_c<C>(load_at<T>(p.noise, e)) : C(0));
        const C mi = Op::kHasModel ? to_c<C>(load_at<T>(p.m, e)) : C(0);
        static_cast<T*>(p.out)[e] = from_c<T>(op.apply(ki, to_c<C>(load_at<T>(p.x, e)), mi, zi, has_z));
        if (Op::kWritesNoise && p.draw) static_cast<T*>(p.noise_out)[e] = from_c<T>(C(z[i]));
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
    case DType::kFloat32: step_kernel<float, Op><<<grid, kThreads, 0, stream>>>(p, op); break;
    case DType::kFloat16: step_kernel<__half, Op><<<grid, kThreads, 0, stream>>>(p, op); break;
    case DType::kBFloat16: step_kernel<__nv_bfloat16, Op><<<grid, kThreads, 0, stream>>>(p, op); break;
    case DType::kFloat64: step_kernel<double, Op><<<grid, kThreads, 0, stream>>>(p, op); break;
  }
}

}  // namespace cuda
}  // namespace diffkern
