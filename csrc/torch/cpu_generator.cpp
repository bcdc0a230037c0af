// CPU generator keying (see cpu_generator.h and diffkern/_rng.py for the rule).
#include "cpu_generator.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/util/intrusive_ptr.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

namespace diffkern {

namespace {

constexpr int64_t kOffsetIncrement = 4;  // per call, as _rng.OFFSET_INCREMENT
constexpr size_t kMaxEntries = 1024;
constexpr size_t kMaxFresh = 64;

// Everything Generator.get_state() serializes, compared field by field (no padding).
struct Fingerprint {
  at::mt19937_data_pod engine;
  bool has_float = false, has_double = false;
  float next_float = 0;
  double next_double = 0;

  static Fingerprint of(at::CPUGeneratorImpl* g) {
    Fingerprint f;
    f.engine = g->engine().data();
    const std::optional<float> nf = g->next_float_normal_sample();
    const std::optional<double> nd = g->next_double_normal_sample();
    f.has_float = nf.has_value();
    f.has_double = nd.has_value();
    if (nf) f.next_float = *nf;
    if (nd) f.next_double = *nd;
    return f;
  }

  static Fingerprint fresh(uint64_t seed) {  // the state manual_seed(seed) leaves
    Fingerprint f;
    f.engine = at::mt19937(seed).data();
    return f;
  }

  bool operator==(const Fingerprint& o) const {
    const auto &a = engine, &b = o.engine;
    if (a.seed_ != b.seed_ || a.left_ != b.left_ || a.seeded_ != b.seeded_ || a.next_ != b.next_) return false;
    if (has_float != o.has_float || has_double != o.has_double) return false;
    if (has_float && std::memcmp(&next_float, &o.next_float, sizeof(float)) != 0) return false;
    if (has_double && std::memcmp(&next_double, &o.next_double, sizeof(double)) != 0) return false;
    return std::memcmp(a.state_.data(), b.state_.data(), sizeof(uint32_t) * a.state_.size()) == 0;
  }
};

struct Entry {
  c10::weak_intrusive_ptr<c10::GeneratorImpl> owner;  // an address is only trusted while its generator lives
  Fingerprint after_last;
  int64_t next_offset;
};

std::mutex g_mutex;
std::unordered_map<const c10::GeneratorImpl*, Entry>& positions() {
  static auto* m = new std::unordered_map<const c10::GeneratorImpl*, Entry>();
  return *m;
}
std::unordered_map<uint64_t, Fingerprint>& fresh_states() {
  static auto* m = new std::unordered_map<uint64_t, Fingerprint>();
  return *m;
}

void evict(std::unordered_map<const c10::GeneratorImpl*, Entry>& map) {
  for (auto it = map.begin(); it != map.end();) it = it->second.owner.expired() ? map.erase(it) : std::next(it);
  if (map.size() >= kMaxEntries) map.erase(map.begin());
}

}  // namespace

std::pair<int64_t, int64_t> cpu_generator_key(const at::Generator& gen) {
  TORCH_CHECK_VALUE(gen.defined() && gen.device().is_cpu(), "generator must be a CPU generator here, got one on ",
                    gen.device());
  auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
  std::lock_guard<std::mutex> gen_lock(impl->mutex_);  // as torch's own ops hold it while drawing
  const uint64_t seed = impl->current_seed();
  const Fingerprint now = Fingerprint::of(impl);
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& map = positions();
  auto it = map.find(impl);
  if (it != map.end() && it->second.owner.expired()) {
    map.erase(it);
    it = map.end();
  }
  int64_t offset;
  if (it != map.end() && it->second.after_last == now) {
    offset = it->second.next_offset;
  } else {
    auto& fresh = fresh_states();
    auto f = fresh.find(seed);
    if (f == fresh.end()) {
      if (fresh.size() > kMaxFresh) fresh.clear();
      f = fresh.emplace(seed, Fingerprint::fresh(seed)).first;
    }
    if (f->second == now) {
      offset = 0;
    } else {
      // Used elsewhere since our last call: a fresh region drawn from it, as
      // torch.randint(0, 2**60, (1,), generator=gen) draws (one 64-bit value mod 2^60).
      offset = int64_t(impl->random64() % (uint64_t(1) << 60)) * kOffsetIncrement;
    }
  }
  // One 32-bit draw (torch.randint(0, 2, (1,)) in the Python rule): our last state then
  // never equals a freshly seeded one, which is how a later manual_seed is recognised.
  impl->random();
  const int64_t next = offset + kOffsetIncrement;
  if (it != map.end()) {
    it->second.after_last = Fingerprint::of(impl);
    it->second.next_offset = next;
  } else {
    if (map.size() >= kMaxEntries) evict(map);
    map.emplace(impl, Entry{c10::weak_intrusive_ptr<c10::GeneratorImpl>(gen.getIntrusivePtr()),
                            Fingerprint::of(impl), next});
  }
  return {int64_t(seed), offset};
}

}  // namespace diffkern
