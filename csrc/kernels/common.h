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

// Where each element's noise levels (sigma*, t*) sit. The levels of a call are arrays of
// one common shape L (broadcastable to x's: per sample (B,1,..,1), per frame (B,1,F,1,1),
// per token (B,N,1), ...), read at one index per element. Along the logical order that
// index is constant over runs of `run` elements (L's trailing broadcast block), so the
// drivers form coefficients once per run and only where the index changes.
struct LevelMap {
  int64_t run = 1;       // consecutive elements sharing a level index (>= 1)
  bool varies = false;   // false: index 0 everywhere (scalar levels)
  bool direct = true;    // run q reads index q; else ix.offset(q) (L broadcasts inside)
  StridedIndexer ix{};   // over the leading (non-run) dims, L's strides (0: broadcast)

  DK_HD int64_t of_run(int64_t q) const { return direct ? q : ix.offset(q); }
  DK_HD int64_t index(int64_t e) const { return varies ? of_run(e / run) : 0; }
};

// The map for a loop over `sizes` (x's shape, or its memory-order permutation) of levels
// with `strides` over it (contiguous in L's own shape, 0 where L broadcasts).
inline LevelMap make_level_map(int ndim, const int64_t* sizes, const int64_t* strides) {
  LevelMap m;
  int k = ndim;
  int64_t run = 1;
  while (k > 0 && (strides[k - 1] == 0 || sizes[k - 1] == 1)) run *= sizes[--k];
  m.run = run > 0 ? run : 1;
  int64_t rs[kMaxDims], rst[kMaxDims];
  int nr = 0;
  for (int d = 0; d < k; ++d) {
    if (sizes[d] == 1) continue;  // no index to add
    rs[nr] = sizes[d];
    rst[nr] = strides[d];
    ++nr;
  }
  if (nr == 0) return m;
  m.varies = true;
  int64_t expect = 1;
  for (int d = nr - 1; d >= 0; --d) {
    m.direct = m.direct && rst[d] == expect;
    expect *= rs[d];
  }
  m.ix.ndim = nr;
  for (int d = 0; d < nr; ++d) {
    m.ix.sizes[d] = rs[d];
    m.ix.strides[d] = rst[d];
  }
  return m;
}

// An operand as both drivers read it (csrc/torch/cpu/driver.h, elementwise.cuh): its data
// in logical order, or through its strides when not contiguous.
struct OperandView {
  const void* data = nullptr;
  bool contiguous = true;
  StridedIndexer ix{};
};

}  // namespace diffkern
