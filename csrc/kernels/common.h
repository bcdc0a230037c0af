// Framework-free basics shared by g++ (CPU loops, native tests) and nvcc (CUDA kernels).
// No torch, no c10: this directory must compile on a machine with only a compiler.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline
#endif

// Every kernel launch: `<<<>>>` under nvcc; elsewhere the CPU emulator (csrc/emu), which
// runs the kernels in CI without a GPU. A kernel name with template arguments goes in
// parentheses (its commas would split the macro's arguments).
#if defined(__CUDACC__)
#define DK_LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<grid, block, shmem, stream>>>(__VA_ARGS__)
#else
#define DK_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  ::dk_emu::launch(kernel, grid, block, shmem, stream, __VA_ARGS__)
#endif

namespace diffkern {

constexpr int kMaxDims = 8;  // strided views beyond this are made contiguous by the binding

DK_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

DK_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

template <class C>
DK_HD C clamp_abs(C v, C c) {
  // NaN passes through, as torch.clamp does.
  return v < -c ? -c : (v > c ? c : v);
}

template <class C>
DK_HD C dk_sqrt(C v);
template <>
DK_HD float dk_sqrt<float>(float v) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(v);
#else
  return __builtin_sqrtf(v);
#endif
}
template <>
DK_HD double dk_sqrt<double>(double v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return __builtin_sqrt(v);
#endif
}

// Logical (row-major) index -> memory offset, for views that are not contiguous or that
// broadcast (stride 0). Sizes/strides in elements; dims beyond `ndim` are ignored.
struct StridedIndexer {
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];

  DK_HD int64_t offset(int64_t linear) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = linear % sizes[d];
      linear /= sizes[d];
      off += i * strides[d];
    }
    return off;
  }
};

// An operand as both drivers read it (csrc/torch/cpu/driver.h, elementwise.cuh): its data
// in logical order, or through its strides when not contiguous.
struct OperandView {
  const void* data = nullptr;
  bool contiguous = true;
  StridedIndexer ix{};
};

}  // namespace diffkern
