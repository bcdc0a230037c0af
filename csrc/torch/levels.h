// The noise levels and timesteps of a call (sigma, sigma_next, sigma_prev, t, t_prev) as
// the kernels read them. A level is a number, or a tensor in one of three layouts
// (README "Noise levels per sample, per frame, per token"):
//   0-d or one element            shared by every element;
//   1-D of length B = x.size(0)   per sample: aligned with x's FIRST dim (torch would
//                                 align a 1-D tensor with the last one);
//   2 <= ndim <= x.dim()          broadcast to x's shape as torch broadcasts, e.g.
//                                 (B,1,F,1,1) per frame, (B,N,1) per token.
// The tensor levels of a call are made arrays of one common shape L (x.dim() long; a copy
// only when a level is not already L-shaped and contiguous), and a LevelMap tells the
// drivers which entry of L each element reads. Nothing here reads a level's values.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "../kernels/ops.h"

namespace diffkern {

// A shape as Python prints it: (2, 3), (2,), ().
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// `t`'s shape aligned to x's dims, checked against the layouts above.
inline at::DimVector level_shape(const at::Tensor& t, const at::Tensor& x, const char* name) {
  const int64_t nd = x.dim();
  at::DimVector s(size_t(nd), 1);
  if (t.dim() == 0) return s;
  if (t.dim() == 1) {
    const int64_t n = t.numel(), b = nd > 0 ? x.size(0) : 1;
    TORCH_CHECK_VALUE(n == 1 || n == b, name, " has ", n, " entries but x has batch size ", b);
    if (nd > 0) s[0] = n;
    return s;
  }
  bool ok = t.dim() <= nd;
  for (int64_t d = 0; ok && d < t.dim(); ++d) {
    const int64_t v = t.size(d), xd = x.size(nd - t.dim() + d);
    ok = v == 1 || v == xd;
    s[size_t(nd - t.dim() + d)] = v;
  }
  TORCH_CHECK_VALUE(ok, name, " of shape ", py_shape(t.sizes()), " does not broadcast to x's shape ",
                    py_shape(x.sizes()));
  return s;
}

// The common shape of aligned level shapes (each broadcasts to x's, so a dim is 1 or x's).
inline void widen_shape(at::DimVector& common, const at::DimVector& s) {
  for (size_t d = 0; d < s.size(); ++d)
    if (s[d] != 1) common[d] = s[d];
}

// `t` (already checked by level_shape) as a contiguous array of the common `shape`, or of
// one element unless `full`.
inline at::Tensor level_array(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name,
                              bool full = false) {
  if (t.numel() == 1 && !full) return t.is_contiguous() ? t : t.contiguous();
  at::Tensor v = t.reshape(level_shape(t, x, name));
  if (v.sizes() != shape) v = v.expand(shape);
  return v.is_contiguous() ? v : v.contiguous();
}

// The map for a loop over x's shape (`x_sizes`), or over its memory-order permutation
// `perm` (channels_last runs), of levels that are contiguous arrays of `shape`.
inline LevelMap level_map(at::IntArrayRef shape, at::IntArrayRef x_sizes, at::IntArrayRef perm = {}) {
  const int64_t nd = int64_t(x_sizes.size());
  if (shape.empty() || nd == 0 || nd > kMaxDims) return LevelMap{};
  TORCH_CHECK(int64_t(shape.size()) == nd, "diffkern: level shape of the wrong rank");
  int64_t strides[kMaxDims], sizes[kMaxDims], ps[kMaxDims], pz[kMaxDims];
  int64_t st = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    sizes[d] = x_sizes[d];
    strides[d] = shape[d] == 1 ? 0 : st;
    st *= shape[d];
  }
  if (!perm.empty()) {
    for (int64_t d = 0; d < nd; ++d) {
      ps[d] = strides[perm[d]];
      pz[d] = sizes[perm[d]];
    }
    return make_level_map(int(nd), pz, ps);
  }
  return make_level_map(int(nd), sizes, strides);
}

// (B, 1, ..., 1) when a call's levels are per sample (linear_step's coefficient rows), else
// nothing: the LevelMap shape of per-sample-only ops.
inline at::DimVector per_sample_shape(const at::Tensor& x, bool per_sample) {
  if (!per_sample || x.dim() == 0) return {};
  at::DimVector s(size_t(x.dim()), 1);
  s[0] = x.size(0);
  return s;
}

// What a family op requires of a level's values (checked where they are readable).
enum class Range {
  kAny,       // nothing (the jacobians: the forward checked them)
  kNonneg,    // finite, >= 0
  kPositive,  // finite, > 0 (the step divides by it)
  kUnit,      // finite, in [0, 1]
};

// The levels of a family op (sigma*, or lcm_step's t / t_prev): checked, made arrays of
// their common shape, kept alive here while the kernel reads them.
//
// Values are checked where reading them costs no device sync: a number always, a tensor
// when it sits on the CPU. A CPU level beside a device x is checked there, then moved (a
// one-element one becomes a number); a level on x's device is never read back (a GPU
// loop does not stall, a CUDA graph captures), and a bad entry there is the kernel's NaN.
class LevelSet {
 public:
  using Named = std::pair<const std::optional<at::Tensor>*, const char*>;
  // on_host: the arrays are host copies (the backward's coefficient tables), wherever the
  // levels live.
  LevelSet(const at::Tensor& x, std::initializer_list<Named> levels, bool on_host = false)
      : x_(x), shape_(size_t(x.dim()), 1), on_host_(on_host) {
    for (const auto& [t, name] : levels)
      if (t && t->has_value()) widen_shape(shape_, level_shape(**t, x, name));
  }
  LevelSet(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> levels,
           bool on_host = false)
      : x_(x), shape_(size_t(x.dim()), 1), on_host_(on_host) {
    for (const auto& [t, name] : levels) widen_shape(shape_, level_shape(*t, x, name));
  }

  // `value` when no tensor is given, else the tensor read per element; its values
  // checked against `range` where they are on the host.
  SampleScalar scalar(const std::optional<at::Tensor>& t, double value, const char* name, Range range = Range::kAny) {
    SampleScalar s;
    s.value = value;
    if (!t.has_value()) {
      check_range(&value, 1, /*is_double=*/true, name, range);
      host_.push_back({name, s});
      return s;
    }
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name,
                     " must be a float32/float64 tensor, got ", t->scalar_type());
    const bool host = t->device().is_cpu() || on_host_;
    TORCH_CHECK_VALUE(host || t->device() == x_.device(), name, " is on ", t->device(), " but x is on ",
                      x_.device());
    at::Tensor a = level_array(on_host_ ? t->to(at::kCPU) : *t, x_, shape_, name);
    if (host && a.numel() > 0) {  // (a zero batch has no values, nor an order to check)
      SampleScalar h = view(a);
      check_range(h.data, h.n, h.is_double, name, range);
      if (x_.device().is_cpu() || on_host_) {
        owners_.push_back(a);
        host_.push_back({name, h});
        return h;
      }
      if (a.numel() == 1) {  // a number on the device side: no copy
        s.value = h.at(0);
        host_.push_back({name, s});
        return s;
      }
      owners_.push_back(a);  // the host copy the order checks read
      host_.push_back({name, h});
      a = a.to(x_.device(), /*non_blocking=*/true);
    }
    owners_.push_back(a);
    return view(a);
  }

  // lower <= upper (lower < upper when strict) at every entry of the common shape, for
  // two levels of this set (by name) whose values are on the host; else ValueError(message).
  void order(const char* lower, const char* upper, const char* message, bool strict) const {
    const SampleScalar* a = find(lower);
    const SampleScalar* b = find(upper);
    if (!a || !b) return;
    auto entries = [](const SampleScalar* s) { return s->data ? s->n : int64_t(1); };
    const int64_t na = entries(a), nb = entries(b);
    if (na == 0 || nb == 0) return;  // a zero batch
    const int64_t n = std::max(na, nb);
    for (int64_t i = 0; i < n; ++i) {
      const double u = a->at(i), v = b->at(i);
      TORCH_CHECK_VALUE(strict ? u < v : u <= v, message);
    }
  }

  // Timesteps (t, t_prev): int64 arrays of the common shape on x's device, both of one
  // size (TimestepArgs reads them at one index). The bindings pass validate::timesteps'
  // (checked, int64); the jacobians the forward's own (any integer type).
  at::Tensor timesteps(const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                     " must be an integer tensor, got ", t.scalar_type());
    owners_.push_back(level_array(placed(t, name).to(at::kLong), x_, shape_, name, /*full=*/true));
    return owners_.back();
  }

  const at::DimVector& shape() const { return shape_; }

 private:
  static SampleScalar view(const at::Tensor& a) {
    SampleScalar s;
    s.data = a.data_ptr();
    s.n = a.numel();
    s.is_double = a.scalar_type() == at::kDouble;
    return s;
  }

  // The messages of diffkern/_validate.py's check_noise_level.
  static void check_range(const void* data, int64_t n, bool is_double, const char* name, Range range) {
    if (range == Range::kAny || n == 0) return;
    auto get = [&](int64_t i) {
      return is_double ? static_cast<const double*>(data)[i] : double(static_cast<const float*>(data)[i]);
    };
    double lo = get(0), hi = lo;
    for (int64_t i = 0; i < n; ++i) {
      const double v = get(i);
      TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    TORCH_CHECK_VALUE(range != Range::kPositive || lo > 0, name, " must be > 0 (the step divides by it), got ", lo);
    TORCH_CHECK_VALUE(lo >= 0, name, " must be >= 0, got ", lo);
    TORCH_CHECK_VALUE(range != Range::kUnit || hi <= 1, name, " must be <= 1, got ", hi);
  }

  const SampleScalar* find(const char* name) const {
    for (const auto& [n, s] : host_)
      if (std::strcmp(n, name) == 0) return &s;
    return nullptr;
  }

  at::Tensor placed(const at::Tensor& t, const char* name) const {
    if (on_host_) return t.to(at::kCPU);
    TORCH_CHECK_VALUE(t.device() == x_.device(), name, " is on ", t.device(), " but x is on ", x_.device());
    return t;
  }

  const at::Tensor& x_;
  at::DimVector shape_;
  bool on_host_ = false;
  std::vector<at::Tensor> owners_;
  std::vector<std::pair<const char*, SampleScalar>> host_;  // the levels readable on the host
};

}  // namespace diffkern
