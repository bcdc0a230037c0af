// A small cache of large CPU output buffers (see output_cache.h for why).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <torch/library.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>
#if defined(_WIN32)
#include <malloc.h>
#endif
#include <deque>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace diffkern {
namespace cpu {

namespace {

constexpr size_t kMinBytes = size_t(128) << 10;  // glibc's default mmap threshold
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMaxBlocks = 8;

size_t cap_from_env() {
  const char* v = std::getenv("DIFFKERN_CPU_CACHE_MB");
  return size_t(v ? std::strtoull(v, nullptr, 10) : 256) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_up(n);
    Block* b = take(bytes);
    if (!b) {
      const size_t align = bytes >= kHuge ? kHuge : 64;
      void* p = aligned_alloc_bytes(align, bytes);
      TORCH_CHECK(p != nullptr, "diffkern: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      // One page fault per 2 MiB on first touch instead of per 4 KiB, where the system
      // grants huge pages on request (transparent_hugepage = madvise); advice, so errors
      // are ignored.
      if (bytes >= kHuge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
      b = new Block{p, bytes};
      std::lock_guard<std::mutex> g(mu_);
      ++misses_;
    }
    return c10::DataPtr(b->ptr, b, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU));
  }

  // A copy_data override on torch >= 2.3, an unused member before.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(cached_bytes_), int64_t(free_.size()), int64_t(hits_), int64_t(misses_), int64_t(cap_)};
  }

  void clear() {
    std::deque<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(free_);
      cached_bytes_ = 0;
    }
    for (Block* b : drop) release(b);
  }

  size_t cap() const { return cap_; }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: outputs may outlive static destructors
    return *cache;
  }

 private:
  static size_t round_up(size_t n) {  // so that nearby sizes share blocks
    const size_t unit = n >= kHuge ? kHuge : (size_t(64) << 10);
    return (n + unit - 1) / unit * unit;
  }

  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->bytes == bytes) {
        Block* b = *it;
        free_.erase(it);
        cached_bytes_ -= bytes;
        ++hits_;
        return b;
      }
    }
    return nullptr;
  }

  // The deleter of every output: keep the block (newest first), evicting the oldest ones
  // beyond the caps, or free it when it alone exceeds them.
  static void give_back(void* ctx) {
    OutputCache& c = get();
    Block* b = static_cast<Block*>(ctx);
    std::deque<Block*> drop;
    {
      std::lock_guard<std::mutex> g(c.mu_);
      if (b->bytes > c.cap_) {
        drop.push_back(b);
      } else {
        c.free_.push_front(b);
        c.cached_bytes_ += b->bytes;
        while (c.cached_bytes_ > c.cap_ || c.free_.size() > kMaxBlocks) {
          drop.push_back(c.free_.back());
          c.cached_bytes_ -= c.free_.back()->bytes;
          c.free_.pop_back();
        }
      }
    }
    for (Block* d : drop) release(d);
  }

  static void* aligned_alloc_bytes(size_t align, size_t bytes) {
#if defined(_WIN32)
    return _aligned_malloc(bytes, align);
#else
    void* p = nullptr;
    return posix_memalign(&p, align, bytes) == 0 ? p : nullptr;
#endif
  }

  static void release(Block* b) {
#if defined(_WIN32)
    _aligned_free(b->ptr);
#else
    std::free(b->ptr);
#endif
    delete b;
  }

  std::mutex mu_;
  std::deque<Block*> free_;
  size_t cached_bytes_ = 0;
  const size_t cap_ = cap_from_env();
  uint64_t hits_ = 0, misses_ = 0;
};

std::vector<int64_t> output_cache_info() { return OutputCache::get().info(); }
void output_cache_clear() { OutputCache::get().clear(); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  OutputCache& cache = OutputCache::get();
  if (bytes < kMinBytes || cache.cap() == 0)
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), at::MemoryFormat::Contiguous);
}

}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("_cpu_output_cache_info() -> int[]", &cpu::output_cache_info);
  m.def("_cpu_output_cache_clear() -> ()", &cpu::output_cache_clear);
}

}  // namespace diffkern
