// Every CUDA kernel of csrc/kernels run through the CPU emulator (csrc/emu), bit-checked
// element by element against the scalar evaluation of its functor: the op's coefficients
// for the element's sample, its apply(), the element's Philox normal, and conversions to
// and from fp16/bf16 written here independently of cuda_fp16/cuda_bf16 (issue 24).
//
// Usage: cuda_emu_tests LIB... where each LIB is a build of the emulation library
// (host branch, device branch: DIFFKERN_EMU_DEVICE_BRANCH). Each is dlopen'ed on its own
// and every case runs against each.
//
// What it covers: every op of elementwise.cuh's one driver (the older step ops through
// SampleStep), operands of mixed dtypes read each in its own, step_backward,
// keyed_normal and the GMM chain; fp32/fp64/fp16/bf16; operands aligned (the 16-byte
// vector path), misaligned, strided (transposed and padded rows) and broadcast (stride 0);
// lengths 1, 7, 1023 and 36004 with per-sample sizes that make 8-element units straddle
// samples; shared and per-sample levels; drawn (eager and graph-captured keys), drawn under
// per-sample keys (seeds=, step=; the step by value or read from memory), given and absent
// noise; 132 SMs and 1 SM (grid-stride loops that wrap). Guard bytes after every
// output catch writes past its end.
//
// Mutation evidence (issue 24, deliverable 4): each bug below was planted by hand in
// csrc/kernels, one at a time, and reverted; failing checks (host branch / device branch)
// of 73,991,026 per branch. None touches code the CPU build compiles (.cu/.cuh files, or a
// __CUDA_ARCH__ branch), so the CPU tests cannot see them.
//   1. 16-bit half-word order swapped in Unit16::load                 7,555,341 / 7,561,388
//   2. last partial unit skipped in step_kernel (since merged into
//      sampler_kernel, the one driver)                                    16,224 / 16,224
//   3. Philox lo/hi swapped in philox_round's __CUDA_ARCH__ branch             0 / 17,614,743
//   4. straddling units keep the first sample's coefficients
//      (sampler_kernel)                                                   71,316 / 71,459
//   5. bf16 stores truncate (__float2bfloat16_rz in Bits16::from_float) 1,782,264 / 1,808,426
//   6. grid-stride step doubled in step_backward_kernel (1 SM wraps)  1,405,760 / 1,405,760
//   7. second __syncthreads removed from gmm_kernel                          840 / 840
//   8. vector path without its length guard (step_kernel, as in 2): guard
//      bytes                                                                  666 / 670
//   9. float16 and bfloat16 storages swapped in load_unit / load_one (mixed
//      dtypes; host branch, measured before the mixed reads got their own kernel
//      instance; scripts/mutation_check.py's cuda-mixed-fp16-read-as-bf16
//      is caught on the current layout)                          11,373,220 / -
// Line coverage of csrc/kernels/*.cu* by this test (gcov, both libraries merged):
// 262/262 source lines; 2186/2250 lines per template instance (the 64 are the noise
// branches of instances no binding reaches: drawn noise for Heun, DPM++ and the LCM
// backward, no noise for flow_q_sample).
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu/emu_api.h"
#include "kernels/gmm.h"
#include "kernels/philox.h"
#include "kernels/ops.h"
#if DIFFKERN_EMU_CPU_DRIVER
// The real CPU driver, compiled here with torch's c10 headers and a serial stand-in for
// at::parallel_for (tests/native/stubs): every elementwise case also runs through it, and
// its outputs must equal the emulated CUDA kernel's bit for bit (issue 24, deliverable 3).
#include "torch/cpu/driver.h"
#endif

using namespace diffkern;
using diffkern::cuda::DType;
using diffkern::cuda::Operand;

namespace {

long long checks = 0, failures = 0;
const dk_emu::Kernels* K = nullptr;
std::string where;  // the case being run, for failure messages

void fail(const char* what, int64_t e, const void* got, const void* want, size_t n) {
  if (++failures <= 30) {
    uint64_t g = 0, w = 0;
    std::memcpy(&g, got, n);
    std::memcpy(&w, want, n);
    std::printf("FAIL [%s] %s[%lld]: got %0*llx want %0*llx\n", where.c_str(), what, (long long)e, int(2 * n),
                (unsigned long long)g, int(2 * n), (unsigned long long)w);
  }
}

// ---- storage conversions, independent of the CUDA headers ----------------------------
size_t esize(DType d) { return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2; }
const char* dname(DType d) {
  return d == DType::kFloat64 ? "f64" : d == DType::kFloat32 ? "f32" : d == DType::kFloat16 ? "f16" : "bf16";
}

float h2f(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return float(v);
}
uint16_t f2h(float f) {
  const _Float16 v = _Float16(f);  // round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
float b2f(uint16_t b) { return __builtin_bit_cast(float, uint32_t(b) << 16); }
uint16_t f2b(float f) {  // round to nearest even; NaN stays NaN (quiet)
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <class C>
C read_as(DType d, const void* p, int64_t off) {
  switch (d) {
    case DType::kFloat64: return C(static_cast<const double*>(p)[off]);
    case DType::kFloat32: return C(static_cast<const float*>(p)[off]);
    case DType::kFloat16: return C(h2f(static_cast<const uint16_t*>(p)[off]));
    default: return C(b2f(static_cast<const uint16_t*>(p)[off]));
  }
}
// The bits of v stored as d (v is double only for fp64).
template <class C>
uint64_t store_bits(DType d, C v) {
  switch (d) {
    case DType::kFloat64: return __builtin_bit_cast(uint64_t, double(v));
    case DType::kFloat32: return __builtin_bit_cast(uint32_t, float(v));
    case DType::kFloat16: return f2h(float(v));
    default: return f2b(float(v));
  }
}
void write_from_double(DType d, void* p, int64_t off, double v) {
  switch (d) {
    case DType::kFloat64: static_cast<double*>(p)[off] = v; break;
    case DType::kFloat32: static_cast<float*>(p)[off] = float(v); break;
    case DType::kFloat16: static_cast<uint16_t*>(p)[off] = f2h(float(v)); break;
    default: static_cast<uint16_t*>(p)[off] = f2b(float(v)); break;
  }
}

struct Rng {
  uint64_t s;
  double uniform(double lo, double hi) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (hi - lo) * double(s >> 11) * (1.0 / 9007199254740992.0);
  }
  uint64_t bits() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return s ^ (s >> 29);
  }
};

// ---- operands ---------------------------------------------------------------------
enum Layout { kAligned, kMisaligned, kStrided, kBroadcast };
const char* lname(Layout l) {
  return l == kAligned ? "aligned" : l == kMisaligned ? "misaligned" : l == kStrided ? "strided" : "broadcast";
}

constexpr size_t kGuard = 64;  // bytes after an output that no launch may touch
constexpr unsigned char kGuardByte = 0xA5;

struct Arr {
  std::vector<unsigned char> mem;
  unsigned char* base = nullptr;
  DType dt = DType::kFloat32;
  int64_t nstore = 0;
  Operand op;
  int64_t off(int64_t e) const { return op.contiguous ? e : op.ix.offset(e); }
};

void alloc(Arr& a, DType dt, int64_t nstore, bool misalign) {
  a.dt = dt;
  a.nstore = nstore;
  const size_t bytes = size_t(nstore) * esize(dt);
  a.mem.assign(bytes + kGuard + 128, kGuardByte);
  const uintptr_t p = (reinterpret_cast<uintptr_t>(a.mem.data()) + 63) & ~uintptr_t(63);
  a.base = reinterpret_cast<unsigned char*>(p) + (misalign ? esize(dt) : 0);
  a.op.data = a.base;
}

// Input `which` of a (B, inner) tensor in layout L; broadcast keeps input 0 (x) dense.
Arr make_input(DType dt, int64_t B, int64_t inner, Layout L, int which, Rng& r, double lo, double hi) {
  Arr a;
  const int64_t numel = B * inner;
  Layout l = L == kBroadcast && which == 0 ? kAligned : L;
  if (l == kAligned || l == kMisaligned) {
    alloc(a, dt, numel, l == kMisaligned);
    a.op.contiguous = true;
  } else {
    a.op.contiguous = false;
    a.op.ix.ndim = 2;
    a.op.ix.sizes[0] = B;
    a.op.ix.sizes[1] = inner;
    if (l == kBroadcast) {
      a.op.ix.strides[0] = 0;
      a.op.ix.strides[1] = 1;
      alloc(a, dt, inner, false);
    } else if (which % 2 == 0) {  // transposed
      a.op.ix.strides[0] = 1;
      a.op.ix.strides[1] = B;
      alloc(a, dt, numel, false);
    } else {  // padded rows
      a.op.ix.strides[0] = inner + 3;
      a.op.ix.strides[1] = 1;
      alloc(a, dt, B * (inner + 3), false);
    }
    a.op.data = a.base;
  }
  for (int64_t i = 0; i < a.nstore; ++i) write_from_double(dt, a.base, i, r.uniform(lo, hi));
  return a;
}

Arr make_output(DType dt, int64_t numel, Layout L) {
  Arr a;
  alloc(a, dt, numel, L == kMisaligned);
  std::memset(a.base, 0xFF, size_t(numel) * esize(dt));  // NaN everywhere: an unwritten element fails
  return a;
}

template <class C>
void check_out(const char* what, const Arr& a, int64_t e, C want) {
  ++checks;
  const uint64_t w = store_bits<C>(a.dt, want);
  uint64_t g = 0;
  std::memcpy(&g, a.base + size_t(e) * esize(a.dt), esize(a.dt));
  if (g != w) fail(what, e, &g, &w, esize(a.dt));
}
void check_guard(const char* what, const Arr& a, int64_t numel) {
  const unsigned char* g = a.base + size_t(numel) * esize(a.dt);
  ++checks;  // one check: the guard is untouched
  for (size_t i = 0; i < kGuard; ++i) {
    if (g[i] != kGuardByte) {
      if (++failures <= 30)
        std::printf("FAIL [%s] %s: byte %zu past the end written\n", where.c_str(), what, i);
      return;
    }
  }
}

// ---- the schedule -------------------------------------------------------------------
constexpr int64_t kT = 1000;
std::vector<float> alphas_cumprod() {
  std::vector<float> t(kT);
  double ab = 1;
  for (int64_t i = 0; i < kT; ++i) {
    ab *= 1.0 - (1e-4 + (0.02 - 1e-4) * double(i) / double(kT - 1));
    t[i] = float(ab);
  }
  return t;
}
const std::vector<float> kTable = alphas_cumprod();

struct Timesteps {
  std::vector<int64_t> t, tp;
  TimestepArgs args(bool explicit_prev) const {
    return TimestepArgs{kTable.data(), kT, t.data(), explicit_prev ? tp.data() : nullptr, int64_t(t.size())};
  }
};
// nt == 1 (shared) or B (per sample); includes t = 0 and final steps (t_prev = -1).
Timesteps make_timesteps(int64_t nt, Rng& r) {
  Timesteps s;
  for (int64_t b = 0; b < nt; ++b) {
    const int64_t t = b % 5 == 3 ? 0 : 1 + int64_t(r.uniform(0, kT - 1));
    s.t.push_back(t);
    s.tp.push_back(b % 4 == 2 ? -1 : t - 1 - int64_t(r.uniform(0, double(t))));
  }
  return s;
}

struct Geometry {
  int64_t B, inner;
};
// Lengths 1, 7, 1023, 36004; per-sample sizes 1, 33, 341, 9001 (not multiples of 8, so
// units straddle samples).
const Geometry kGeoms[] = {{1, 1}, {7, 1}, {31, 33}, {3, 341}, {4, 9001}};

// The level map of per-sample (or shared) levels over a (B, inner) loop, as the bindings
// build it (csrc/torch/levels.h).
LevelMap sample_levels(Geometry g, bool per_sample) {
  const int64_t sizes[2] = {g.B, g.inner}, strides[2] = {per_sample ? 1 : 0, 0};
  return make_level_map(2, sizes, strides);
}
const DType kDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};
const Layout kLayouts[] = {kAligned, kMisaligned, kStrided, kBroadcast};
// kKeyed: per-sample keys (seeds=, step=), the step read from "device" memory on odd cases
enum Noise { kNone, kGiven, kDrawn, kCaptured, kKeyed };
const char* nname(Noise n) {
  return n == kNone ? "none" : n == kGiven ? "given" : n == kDrawn ? "drawn" : n == kCaptured ? "captured" : "keyed";
}

int case_index = 0;
int next_device() { return (case_index++) & 1; }  // device 1 has 1 SM

struct RngSetup {
  cuda::RngArgs args;
  PhiloxKey key;
  int64_t seed_store, offset_store;
  std::vector<int64_t> seeds;
  int64_t step_store = 0;
  KeyedArgs keyed;  // the kernel's (step maybe behind a pointer)
  KeyedArgs keyed_cpu() const {  // the CPU driver's: the binding reads the step on the host
    KeyedArgs k = keyed;
    k.step_ptr = nullptr;
    k.step = uint64_t(step_store);
    return k;
  }
};
void setup_rng(RngSetup& s, Noise n, Rng& r, int64_t B = 1, int64_t inner = 1) {
  s.args = cuda::RngArgs{};
  s.keyed = KeyedArgs{};
  if (n == kKeyed) {
    const bool one = (r.bits() & 3) == 0;  // sometimes one seed for every sample
    s.seeds.clear();
    for (int64_t b = 0; b < (one ? 1 : B); ++b) s.seeds.push_back(int64_t(r.bits()));
    s.step_store = int64_t(r.bits() >> 3);  // < 2^61
    s.keyed.seeds = s.seeds.data();
    s.keyed.nseeds = int64_t(s.seeds.size());
    s.keyed.inner = inner;
    if (case_index & 1)
      s.keyed.step_ptr = &s.step_store;
    else
      s.keyed.step = uint64_t(s.step_store);
    return;
  }
  const uint64_t seed = r.bits(), offset = (r.bits() & 0xFFFFFFFull) * 4;
  if (n == kCaptured) {
    s.seed_store = int64_t(seed >> 1);
    s.offset_store = int64_t(offset);
    s.args.captured = true;
    s.args.seed_ptr = &s.seed_store;
    s.args.offset_ptr = &s.offset_store;
    s.args.offset_intragraph = 8;
    s.key = PhiloxKey{uint64_t(s.seed_store), uint64_t(s.offset_store) + 8};
  } else {
    s.args.seed = seed;
    s.args.offset = offset;
    s.key = PhiloxKey{seed, offset};
  }
}

// The keyed normals of elements 0..numel-1: element j of sample b from (seeds[b], step).
std::vector<float> keyed_normals(const RngSetup& s, int64_t numel) {
  std::vector<float> z(static_cast<size_t>(numel));
  const int64_t inner = s.keyed.inner;
  for (int64_t e = 0; e < numel; ++e)
    z[e] = keyed_normal_at(uint64_t(s.seeds[s.seeds.size() == 1 ? 0 : e / inner]), uint64_t(s.step_store),
                           uint64_t(e % inner));
  return z;
}

// The drawn normals of elements 0..numel-1 (philox_normal4 per group of four).
std::vector<float> drawn_normals(PhiloxKey key, int64_t numel) {
  std::vector<float> z(size_t(numel + 3) & ~size_t(3));
  for (int64_t g = 0; 4 * g < numel; ++g) {
    const Float4 q = philox_normal4(key, uint64_t(g));
    for (int i = 0; i < 4; ++i) z[4 * g + i] = q.v[i];
  }
  return z;
}

// ---- the CPU driver on the same operands ----------------------------------------------
long long driver_checks = 0;
#if DIFFKERN_EMU_CPU_DRIVER
// Runs `op` (the driver interface of op_base.h) through cpu::run_elementwise with the
// launch's operands, noise and key, and compares each output the binding would allocate
// (for a kWritesNoise op, the noise only when drawn) with the emulated kernel's.
cpu::Storage storage_in(DType s, DType dt) {
  if (s == dt) return cpu::Storage::kSame;
  switch (s) {
    case DType::kFloat16: return cpu::Storage::kHalf;
    case DType::kBFloat16: return cpu::Storage::kBFloat16;
    case DType::kFloat32: return cpu::Storage::kFloat;
    default: return cpu::Storage::kDouble;
  }
}

template <class Op>
void compare_cpu_driver(const Op& op, DType dt, const Arr* in, int nin, const Arr* noise, bool draw, PhiloxKey key,
                        int64_t numel, const LevelMap& levels, const Arr* emu_outs, int nout,
                        const KeyedArgs& keyed) {
  cpu::StepIO io;
  for (int j = 0; j < nin; ++j) {
    io.in[j] = in[j].op;
    io.in_storage[j] = storage_in(in[j].dt, dt);
  }
  io.nin = nin;
  if (noise) {
    io.noise = noise->op;
    io.noise_storage = storage_in(noise->dt, dt);
    io.has_noise = true;
  }
  io.draw = draw;
  io.key = key;
  io.keyed = keyed;
  const int n = Op::kWritesNoise ? (draw ? 2 : 1) : nout;
  Arr outs[kMaxLinearOutputs];
  for (int j = 0; j < n; ++j) {
    outs[j] = make_output(dt, numel, kAligned);
    io.out[j] = outs[j].base;
  }
  switch (dt) {
    case DType::kFloat32: cpu::run_elementwise<float>(op, io, numel, levels); break;
    case DType::kFloat64: cpu::run_elementwise<double>(op, io, numel, levels); break;
    case DType::kFloat16: cpu::run_elementwise<c10::Half>(op, io, numel, levels); break;
    case DType::kBFloat16: cpu::run_elementwise<c10::BFloat16>(op, io, numel, levels); break;
  }
  static const char* const kNames[kMaxLinearOutputs] = {"cpu driver out0", "cpu driver out1", "cpu driver out2"};
  const size_t es = esize(dt);
  for (int j = 0; j < n; ++j) {
    for (int64_t e = 0; e < numel; ++e) {
      ++checks;
      ++driver_checks;
      const unsigned char* want = outs[j].base + size_t(e) * es;
      const unsigned char* got = emu_outs[j].base + size_t(e) * es;
      if (std::memcmp(got, want, es) != 0) fail(kNames[j], e, got, want, es);
    }
  }
}
#endif

// ---- sampler ops (SamplerLaunch) ----------------------------------------------------
// Operands stored in other dtypes than the launch's (a mixed-dtype call): each input's and
// the noise's; the launch's dtype is their promotion.
struct Storages {
  DType in[kMaxLinearInputs];
  DType noise;
};

template <class C, class Op, class Launcher>
void run_sampler_case(const Op& op, Launcher launch, int nin, int nout, DType dt, Geometry g, Layout L, Noise nz,
                      Rng& r, bool per_sample, const Storages* st = nullptr) {
  const int64_t numel = g.B * g.inner;
  cuda::SamplerLaunch p;
  p.dtype = dt;
  p.numel = numel;
  p.levels = sample_levels(g, per_sample);
  p.nin = nin;
  Arr in[kMaxLinearInputs];
  for (int i = 0; i < nin; ++i) {
    in[i] = make_input(st ? st->in[i] : dt, g.B, g.inner, L, i, r, -3, 3);
    p.in[i] = in[i].op;
    p.in_dtype[i] = in[i].dt;
    p.mixed = p.mixed || in[i].dt != dt;
  }
  Arr nn = make_input(st ? st->noise : dt, g.B, g.inner, L, 3, r, -3, 3);
  p.noise_dtype = nn.dt;
  p.mixed = p.mixed || (nz == kGiven && nn.dt != dt);
  Arr outs[kMaxLinearOutputs] = {make_output(dt, numel, L), make_output(dt, numel, L), make_output(dt, numel, L)};
  p.has_noise = nz == kGiven;
  if (p.has_noise) p.noise = nn.op;
  p.draw = nz == kDrawn || nz == kCaptured || nz == kKeyed;
  RngSetup rs;
  setup_rng(rs, nz, r, g.B, g.inner);
  p.rng = rs.args;
  p.keyed = rs.keyed;
  p.vectorized = L == kAligned;
  for (int o = 0; o < kMaxLinearOutputs; ++o) p.out[o] = o < nout ? outs[o].base : nullptr;
  p.device = next_device();
  launch(p, op, nullptr);
  using Kc = typename Op::template Coeffs<C>;
  const bool has_z = p.draw || p.has_noise;
  std::vector<Kc> ks;  // per sample, formed once (in double, rounded: the driver's convention)
  for (int64_t b = 0; b < (p.levels.varies ? g.B : 1); ++b) ks.push_back(Kc::from(op.template coeffs<double>(b)));
  const std::vector<float> zs = !p.draw        ? std::vector<float>{}
                                : nz == kKeyed ? keyed_normals(rs, numel)
                                               : drawn_normals(rs.key, numel);
  for (int64_t e = 0; e < numel; ++e) {
    const Kc& k = ks[p.levels.varies ? e / g.inner : 0];
    const C z = p.draw ? C(zs[e]) : p.has_noise ? read_as<C>(nn.dt, nn.base, nn.off(e)) : C(0);
    constexpr int kIn = Op::kInputs, kOut = Op::kOutputs > 2 ? Op::kOutputs : 2;
    C v[kIn] = {}, o[kOut] = {};
    for (int i = 0; i < nin; ++i) v[i] = read_as<C>(in[i].dt, in[i].base, in[i].off(e));
    if (has_z)
      apply_op<true, kIn, kOut>(op, k, v, z, o);
    else
      apply_op<false, kIn, kOut>(op, k, v, z, o);
    static const char* const kOutNames[kMaxLinearOutputs] = {"out0", "out1", "out2"};
    for (int j = 0; j < nout; ++j) check_out<C>(kOutNames[j], outs[j], e, Op::kWritesNoise && j == 1 ? z : o[j]);
  }
  for (int j = 0; j < nout; ++j) check_guard(j == 0 ? "out0" : j == 1 ? "out1" : "out2", outs[j], numel);
#if DIFFKERN_EMU_CPU_DRIVER
  // The CPU driver reads other dtypes in its contiguous loop only (its binding casts
  // strided ones first).
  if (!p.mixed || L == kAligned || L == kMisaligned)
    compare_cpu_driver(op, dt, in, nin, p.has_noise ? &nn : nullptr, p.draw, rs.key, numel, p.levels, outs, nout,
                       rs.keyed_cpu());
#endif
}

template <class C, class Op, class Launcher>
void run_sampler_case(const Op& op, Launcher launch, int nin, int nout, DType dt, Geometry g, Layout L, Noise nz,
                      Rng& r) {
  run_sampler_case<C>(op, launch, nin, nout, dt, g, L, nz, r, op.per_sample());
}

// The older step ops (q_sample, ddim, ddpm, langevin) run on the same driver through
// SampleStep; `launch` takes the op itself. q_sample writes its drawn noise (out1).
template <class C, class Op, class Launcher>
void run_step_case(const Op& op, Launcher launch, DType dt, Geometry g, Layout L, Noise nz, bool per_sample, Rng& r,
                   const Storages* st = nullptr) {
  const bool draws = nz == kDrawn || nz == kCaptured || nz == kKeyed;
  run_sampler_case<C>(
      SampleStep<Op>{op},
      [&](const cuda::SamplerLaunch& p, const SampleStep<Op>& s, cudaStream_t stream) { launch(p, s.op, stream); },
      Op::kHasModel ? 2 : 1, Op::kWritesNoise && draws ? 2 : 1, dt, g, L, nz, r, per_sample, st);
}

// ---- the loops over dtypes, layouts, geometries, levels, noise -----------------------
template <class F>
void for_all(const char* op, std::vector<Noise> noises, bool per_sample_levels, F body) {
  Rng r{0x5EEDull + uint64_t(case_index)};
  for (DType dt : kDtypes)
    for (Layout L : kLayouts)
      for (const Geometry& g : kGeoms)
        for (int ps = 0; ps <= (per_sample_levels ? 1 : 0); ++ps)
          for (Noise nz : noises) {
            char buf[200];
            std::snprintf(buf, sizeof buf, "%s %s %s %s B=%lld inner=%lld %s noise=%s", K->device_branch ? "device" : "host",
                          op, dname(dt), lname(L), (long long)g.B, (long long)g.inner, ps ? "per-sample" : "shared",
                          nname(nz));
            where = buf;
            if (dt == DType::kFloat64)
              body.template operator()<double>(dt, g, L, nz, ps == 1, r);
            else
              body.template operator()<float>(dt, g, L, nz, ps == 1, r);
          }
}

SampleScalar scalar_of(std::vector<double>& store, int64_t n, bool per_sample, double lo, double hi, Rng& r) {
  store.clear();
  for (int64_t i = 0; i < (per_sample ? n : 1); ++i) store.push_back(r.uniform(lo, hi));
  SampleScalar s;
  if (per_sample && n > 1) {
    s.data = store.data();
    s.n = n;
    s.is_double = true;
  } else {
    s.value = store[0];
  }
  return s;
}

void test_step_ops() {
  for (int variant = 0; variant < 3; ++variant) {
    for_all("ddim", {kNone, kGiven, kDrawn, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
      const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
      DdimOp op{ts.args(variant != 1), variant == 2 ? 0.0 : 1.0, variant, variant != 0, 1.0};
      run_step_case<C>(op, K->ddim_step, dt, g, L, nz, ps, r);
    });
  }
  for (int variant = 0; variant < 2; ++variant) {
    for_all("ddpm", {kNone, kGiven, kCaptured, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
      const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
      DdpmOp op{ts.args(variant == 1), variant, 2 - variant, variant == 0, 1.5};
      run_step_case<C>(op, K->ddpm_step, dt, g, L, nz, ps, r);
    });
  }
  for_all("q_sample", {kGiven, kDrawn, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
    const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
    QSampleOp op{ts.args(false)};
    run_step_case<C>(op, K->q_sample, dt, g, L, nz, ps, r);
  });
  for_all("langevin", {kNone, kGiven, kDrawn, kKeyed}, false, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
    LangevinOp op{r.uniform(1e-4, 0.1)};
    run_step_case<C>(op, K->langevin_step, dt, g, L, nz, ps, r);
  });
}

void test_sampler_ops() {
  std::vector<double> s1, s2, s3;
  // Euler: plain, ancestral (eta), churn (gamma); predictions epsilon / v / sample.
  for (int variant = 0; variant < 3; ++variant) {
    const std::vector<Noise> noises = variant == 0 ? std::vector<Noise>{kNone} : std::vector<Noise>{kNone, kGiven, kDrawn, kKeyed};
    for_all("euler", noises, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
      EulerOp op{};
      op.sigma = scalar_of(s1, g.B, ps, 2.0, 14.0, r);
      op.sigma_next = scalar_of(s2, g.B, ps, 0.0, 1.9, r);
      if (ps && g.B > 2) s2[1] = 0.0;  // a final row: no noise term
      op.eta = variant == 1 ? 1.0 : 0.0;
      op.s_noise = 1.0;
      op.gamma = variant == 2 ? 0.3 : 0.0;
      op.prediction = variant;
      run_sampler_case<C>(op, K->euler_step, 2, 1, dt, g, L, nz, r);
    });
  }
  for_all("heun", {kNone}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
    HeunOp op{};
    op.sigma = scalar_of(s1, g.B, ps, 2.0, 14.0, r);
    op.sigma_next = scalar_of(s2, g.B, ps, 0.1, 1.9, r);
    op.prediction = int(r.bits() % 3);
    run_sampler_case<C>(op, K->heun_step, 4, 1, dt, g, L, nz, r);
  });
  for (int variant = 0; variant < 3; ++variant) {
    for_all("dpmpp_2m", {kNone}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
      DpmppOp op{};
      op.sigma = scalar_of(s1, g.B, ps, 2.0, 14.0, r);
      op.sigma_next = scalar_of(s2, g.B, ps, 0.1, 1.9, r);
      if (ps && g.B > 2) s2[2] = 0.0;  // a final row lands on the denoised sample
      op.sigma_prev = scalar_of(s3, g.B, ps, 15.0, 20.0, r);
      op.prediction = variant;
      op.solver = variant == 1 ? kHeun : kMidpoint;
      op.variance_preserving = variant == 2;
      op.has_old = variant != 0;
      run_sampler_case<C>(op, K->dpmpp_2m_step, op.has_old ? 3 : 2, 2, dt, g, L, nz, r);
    });
  }
  for_all("flow", {kNone, kGiven, kDrawn, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
    FlowOp op{};
    op.sigma = scalar_of(s1, g.B, ps, 0.5, 1.0, r);
    op.sigma_next = scalar_of(s2, g.B, ps, 0.0, 0.5, r);
    op.stochastic = nz != kNone;
    run_sampler_case<C>(op, K->flow_step, 2, 1, dt, g, L, nz, r);
  });
  for_all("flow_q_sample", {kGiven, kDrawn, kCaptured, kKeyed}, true,
          [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
            FlowQSampleOp op{};
            op.sigma = scalar_of(s1, g.B, ps, 0.0, 1.0, r);
            run_sampler_case<C>(op, K->flow_q_sample, 1, nz != kGiven ? 2 : 1, dt, g, L, nz, r);
          });
  for (int variant = 0; variant < 2; ++variant) {
    for_all("lcm", {kNone, kGiven, kDrawn, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
      const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
      LcmOp op{ts.args(true), 10.0, 0.5, variant == 0 ? kEpsilon : kVPrediction, variant == 0, 1.0, true};
      run_sampler_case<C>(op, K->lcm_step, 2, 2, dt, g, L, nz, r);
    });
  }
  // linear_step: every input count, 1-3 outputs, shared and per-sample coefficient rows
  // (a per-sample table with a zero noise coefficient in one row: no noise term there).
  std::vector<double> lt;
  for (int nin = 1; nin <= kMaxLinearInputs; ++nin) {
    const int nout = 1 + nin % kMaxLinearOutputs;
    for_all("linear", {kNone, kGiven, kDrawn, kKeyed}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps,
                                                                  Rng& r) {
      LinearOp op{};
      op.nin = nin;
      op.nout = nout;
      const int w = nout * (nin + 1);
      lt.clear();
      for (int64_t b = 0; b < (ps ? g.B : 1); ++b)
        for (int i = 0; i < w; ++i) lt.push_back(r.uniform(-2.0, 2.0));
      if (ps && g.B > 2) lt[size_t(w) + nin] = 0.0;
      if (ps) {
        op.table = lt.data();
        op.rows = g.B;
      } else {
        for (int i = 0; i < w; ++i) op.shared[i] = lt[size_t(i)];
      }
      run_sampler_case<C>(op, K->linear_step, nin, nout, dt, g, L, nz, r);
    });
  }
  for_all("lcm_backward", {kNone}, true, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, bool ps, Rng& r) {
    const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
    LcmBackwardOp op{LcmOp{ts.args(true), 10.0, 0.5, kEpsilon, true, 1.0, true}};
    run_sampler_case<C>(op, K->lcm_step_backward, 4, 2, dt, g, L, nz, r);
  });
}

// ---- mixed dtypes: each operand read in its own dtype ---------------------------------
// The launch's dtype is the promotion (float32 or float64); inputs and noise are stored in
// narrower or equal dtypes, rotated over the operands so that every input slot sees each.
template <class F>
void for_mixed(const char* op, std::vector<Noise> noises, F body) {
  Rng r{0xD7E5ull + uint64_t(case_index)};
  const DType narrow32[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32};
  const DType narrow64[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64};
  for (DType dt : {DType::kFloat32, DType::kFloat64})
    for (int rot = 0; rot < 3; ++rot)
      for (Layout L : kLayouts)
        for (const Geometry& g : kGeoms)
          for (Noise nz : noises) {
            const bool f64 = dt == DType::kFloat64;
            const int nc = f64 ? 4 : 3;
            Storages st;
            for (int i = 0; i < kMaxLinearInputs; ++i) st.in[i] = (f64 ? narrow64 : narrow32)[(i + rot) % nc];
            st.noise = (f64 ? narrow64 : narrow32)[(rot + 1) % nc];
            char buf[200];
            std::snprintf(buf, sizeof buf, "%s mixed %s %s rot=%d %s B=%lld inner=%lld noise=%s",
                          K->device_branch ? "device" : "host", op, dname(dt), rot, lname(L), (long long)g.B,
                          (long long)g.inner, nname(nz));
            where = buf;
            if (f64)
              body.template operator()<double>(dt, g, L, nz, st, r);
            else
              body.template operator()<float>(dt, g, L, nz, st, r);
          }
}

void test_mixed_dtypes() {
  std::vector<double> s1, s2, s3;
  for_mixed("ddim", {kNone, kGiven, kKeyed}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    const Timesteps ts = make_timesteps(g.B, r);
    const DdimOp op{ts.args(true), 1.0, kEpsilon, true, 1.0};
    run_step_case<C>(op, K->ddim_step, dt, g, L, nz, true, r, &st);
  });
  for_mixed("q_sample", {kGiven, kDrawn}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    const Timesteps ts = make_timesteps(g.B, r);
    run_step_case<C>(QSampleOp{ts.args(false)}, K->q_sample, dt, g, L, nz, true, r, &st);
  });
  for_mixed("langevin", {kGiven}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    run_step_case<C>(LangevinOp{r.uniform(1e-4, 0.1)}, K->langevin_step, dt, g, L, nz, false, r, &st);
  });
  for_mixed("euler", {kGiven, kDrawn}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    EulerOp op{};
    op.sigma = scalar_of(s1, g.B, true, 2.0, 14.0, r);
    op.sigma_next = scalar_of(s2, g.B, true, 0.0, 1.9, r);
    op.eta = 1.0;
    op.s_noise = 1.0;
    run_sampler_case<C>(op, K->euler_step, 2, 1, dt, g, L, nz, r, op.per_sample(), &st);
  });
  for_mixed("heun", {kNone}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    HeunOp op{};
    op.sigma = scalar_of(s1, g.B, true, 2.0, 14.0, r);
    op.sigma_next = scalar_of(s2, g.B, true, 0.1, 1.9, r);
    run_sampler_case<C>(op, K->heun_step, 4, 1, dt, g, L, nz, r, op.per_sample(), &st);
  });
  for_mixed("dpmpp_2m", {kNone}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    DpmppOp op{};
    op.sigma = scalar_of(s1, g.B, true, 2.0, 14.0, r);
    op.sigma_next = scalar_of(s2, g.B, true, 0.1, 1.9, r);
    op.sigma_prev = scalar_of(s3, g.B, true, 15.0, 20.0, r);
    op.has_old = true;
    run_sampler_case<C>(op, K->dpmpp_2m_step, 3, 2, dt, g, L, nz, r, op.per_sample(), &st);
  });
  std::vector<double> lt;
  for_mixed("linear", {kGiven}, [&]<class C>(DType dt, Geometry g, Layout L, Noise nz, const Storages& st, Rng& r) {
    LinearOp op{};
    op.nin = kMaxLinearInputs;
    op.nout = 2;
    for (int i = 0; i < op.nout * (op.nin + 1); ++i) op.shared[i] = r.uniform(-2.0, 2.0);
    run_sampler_case<C>(op, K->linear_step, kMaxLinearInputs, 2, dt, g, L, nz, r, false, &st);
  });
}

// ---- step_backward ----------------------------------------------------------------
template <class C, class Op>
void run_backward_case(int kind, const DdimOp& ddim, const DdpmOp& ddpm, const Op& op, bool grad_noise, DType dt,
                       Geometry g, Layout L, bool per_sample, Rng& r) {
  const int64_t numel = g.B * g.inner;
  cuda::BackwardLaunch p;
  p.dtype = dt;
  p.numel = numel;
  p.levels = sample_levels(g, per_sample);
  Arr gr = make_input(dt, g.B, g.inner, L, 0, r, -2, 2);
  Arr x = make_input(dt, g.B, g.inner, L, 1, r, -3, 3);
  Arr m = make_input(dt, g.B, g.inner, L, 2, r, -3, 3);
  Arr gx = make_output(dt, numel, L), gm = make_output(dt, numel, L), gn = make_output(dt, numel, L);
  p.grad = gr.op;
  p.x = x.op;
  p.m = m.op;
  p.grad_x = gx.base;
  p.grad_m = gm.base;
  p.grad_noise = grad_noise ? gn.base : nullptr;
  p.device = next_device();
  K->step_backward(p, kind, ddim, ddpm, nullptr);
  std::vector<StepCoeffs<C>> ks;
  for (int64_t b = 0; b < (per_sample ? g.B : 1); ++b) ks.push_back(cast_coeffs<C>(op.template coeffs<double>(b)));
  for (int64_t e = 0; e < numel; ++e) {
    const StepCoeffs<C>& k = ks[per_sample ? e / g.inner : 0];
    const C gv = read_as<C>(dt, gr.base, gr.off(e));
    C wx, wm;
    step_backward<C>(k, read_as<C>(dt, x.base, x.off(e)), read_as<C>(dt, m.base, m.off(e)), gv, op.has_clip, C(op.clip),
                     &wx, &wm);
    check_out<C>("grad_x", gx, e, wx);
    check_out<C>("grad_m", gm, e, wm);
    if (grad_noise) check_out<C>("grad_noise", gn, e, k.std * gv);
  }
  check_guard("grad_x", gx, numel);
  check_guard("grad_m", gm, numel);
  if (grad_noise) check_guard("grad_noise", gn, numel);
}

void test_step_backward() {
  for (int kind = 0; kind < 2; ++kind) {
    for_all(kind == 0 ? "ddim_backward" : "ddpm_backward", {kNone}, true,
            [&]<class C>(DType dt, Geometry g, Layout L, Noise, bool ps, Rng& r) {
              const Timesteps ts = make_timesteps(ps ? g.B : 1, r);
              const DdimOp ddim{ts.args(true), 1.0, kEpsilon, true, 1.0};
              const DdpmOp ddpm{ts.args(false), kFixedSmall, kVPrediction, true, 1.0};
              const bool gn = (case_index & 2) != 0;
              if (kind == 0)
                run_backward_case<C>(0, ddim, ddpm, ddim, gn, dt, g, L, ps, r);
              else
                run_backward_case<C>(1, ddim, ddpm, ddpm, gn, dt, g, L, ps, r);
            });
  }
}

// ---- keyed_normal ------------------------------------------------------------------
void test_keyed_normal() {
  Rng r{77};
  const Geometry geoms[] = {{1, 1}, {7, 1}, {3, 5}, {2, 12}, {3, 341}, {4, 9001}, {1, 36004}};
  for (const Geometry& g : geoms)
    for (int per_sample_seeds = 0; per_sample_seeds < 2; ++per_sample_seeds)
      for (int step_in_memory = 0; step_in_memory < 2; ++step_in_memory) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s keyed_normal B=%lld inner=%lld seeds=%s step=%s",
                      K->device_branch ? "device" : "host", (long long)g.B, (long long)g.inner,
                      per_sample_seeds ? "per-sample" : "one", step_in_memory ? "memory" : "value");
        where = buf;
        const int64_t numel = g.B * g.inner;
        std::vector<int64_t> seeds;
        for (int64_t b = 0; b < (per_sample_seeds ? g.B : 1); ++b) seeds.push_back(int64_t(r.bits() >> 1));
        const int64_t step = int64_t(r.bits() & 0xFFFF);
        Arr out = make_output(DType::kFloat32, numel, kAligned);
        cuda::KeyedLaunch p;
        p.seeds = seeds.data();
        p.nseeds = int64_t(seeds.size());
        p.step_ptr = step_in_memory ? &step : nullptr;
        p.step = step_in_memory ? 12345 : uint64_t(step);  // ignored when step_ptr is set
        p.inner = g.inner;
        p.numel = numel;
        p.out = reinterpret_cast<float*>(out.base);
        p.device = next_device();
        K->keyed_normal(p, nullptr);
        for (int64_t e = 0; e < numel; ++e) {
          const int64_t b = e / g.inner, j = e - b * g.inner;
          check_out<float>("out", out, e,
                           keyed_normal_at(uint64_t(seeds[seeds.size() == 1 ? 0 : b]), uint64_t(step), uint64_t(j)));
        }
        check_guard("out", out, numel);
      }
}

// ---- the GMM chain (the kernel with __syncthreads) -----------------------------------
template <class C>
void run_gmm_case(int64_t npoints, int D, int Kc, int L, int64_t nsteps, bool denoise, Rng& r) {
  std::vector<C> w(Kc), mu(Kc * D), sd(Kc * D), x(npoints * D);
  for (auto& v : w) v = C(r.uniform(0.1, 1.0));
  w[0] = C(0);  // a component of weight 0 (lp = -inf)
  for (auto& v : mu) v = C(r.uniform(-4, 4));
  for (auto& v : sd) v = C(r.uniform(0.2, 1.5));
  for (auto& v : x) v = C(r.uniform(-6, 6));
  std::vector<double> sigmas(L);
  for (int l = 0; l < L; ++l) sigmas[l] = 5.0 * std::pow(0.5, l);
  std::vector<C> got = x;
  cuda::GmmLaunch p;
  p.is_double = sizeof(C) == 8;
  p.x = got.data();
  p.npoints = npoints;
  p.D = D;
  p.K = Kc;
  p.weights = w.data();
  p.means = mu.data();
  p.stds = sd.data();
  p.sigmas = sigmas.data();
  p.L = L;
  p.n_steps_each = nsteps;
  p.step_lr = 2e-3;
  p.sigma_last = sigmas[L - 1];
  p.denoise = denoise;
  p.rng.seed = r.bits();
  p.rng.offset = (r.bits() & 0xFFFF) * 4;
  K->gmm_annealed_langevin(p, nullptr);
  // The oracle: each point's chain on its own, with the same gmm.h terms.
  const PhiloxKey key{p.rng.seed, p.rng.offset};
  std::vector<C> inv_var(Kc * D), lognorm(Kc);
  const uint64_t numel = uint64_t(npoints) * uint64_t(D);
  std::vector<C> want = x;
  for (int64_t pt = 0; pt < npoints; ++pt) {
    C xp[kGmmMaxDim], score[kGmmMaxDim];
    float z[kGmmMaxDim];
    for (int d = 0; d < D; ++d) xp[d] = x[pt * D + d];
    uint64_t step = 0;
    for (int l = 0; l <= L; ++l) {
      if (l == L && !denoise) break;
      const double sigma = l < L ? sigmas[l] : p.sigma_last;
      for (int k = 0; k < Kc; ++k) gmm_component_constants<C>(w.data(), sd.data(), k, D, C(sigma), inv_var.data(), lognorm.data());
      if (l == L) {
        gmm_score_point<C>(xp, D, Kc, mu.data(), inv_var.data(), lognorm.data(), score);
        const C s2 = C(p.sigma_last * p.sigma_last);
        for (int d = 0; d < D; ++d) xp[d] = xp[d] + s2 * score[d];
        break;
      }
      const double ratio = sigma / p.sigma_last, alpha = p.step_lr * ratio * ratio;
      const C a = C(alpha), ns = C(std::sqrt(2 * alpha));
      for (int64_t s = 0; s < nsteps; ++s, ++step) {
        gmm_score_point<C>(xp, D, Kc, mu.data(), inv_var.data(), lognorm.data(), score);
        gmm_step_noise(key, step, numel, uint64_t(pt), D, z);
        gmm_langevin_update<C>(xp, score, z, D, a, ns);
      }
    }
    for (int d = 0; d < D; ++d) want[pt * D + d] = xp[d];
  }
  for (int64_t i = 0; i < npoints * D; ++i) {
    ++checks;
    if (__builtin_memcmp(&got[i], &want[i], sizeof(C)) != 0) fail("x", i, &got[i], &want[i], sizeof(C));
  }
}

void test_gmm() {
  Rng r{99};
  struct G {
    int64_t npoints;
    int D, K, L;
    int64_t nsteps;
    bool denoise;
  } cases[] = {{1, 1, 1, 1, 1, false}, {300, 3, 5, 3, 4, true}, {129, 2, 64, 2, 2, false}, {200, 16, 9, 2, 3, true}};
  for (const G& c : cases)
    for (int dbl = 0; dbl < 2; ++dbl) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s gmm %s npoints=%lld D=%d K=%d L=%d", K->device_branch ? "device" : "host",
                    dbl ? "f64" : "f32", (long long)c.npoints, c.D, c.K, c.L);
      where = buf;
      if (dbl)
        run_gmm_case<double>(c.npoints, c.D, c.K, c.L, c.nsteps, c.denoise, r);
      else
        run_gmm_case<float>(c.npoints, c.D, c.K, c.L, c.nsteps, c.denoise, r);
    }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s EMULATION_LIBRARY...\n", argv[0]);
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    void* h = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      std::fprintf(stderr, "dlopen %s: %s\n", argv[i], dlerror());
      return 2;
    }
    auto get = reinterpret_cast<const dk_emu::Kernels* (*)()>(dlsym(h, "dk_emu_kernels"));
    if (!get) {
      std::fprintf(stderr, "%s: no dk_emu_kernels\n", argv[i]);
      return 2;
    }
    K = get();
    K->set_sm_count(0, 132);
    K->set_sm_count(1, 1);
    const long long before = checks, failed = failures;
    test_step_ops();
    test_sampler_ops();
    test_mixed_dtypes();
    test_step_backward();
    test_keyed_normal();
    test_gmm();
    std::printf("%s branch: %lld checks, %lld failed, %lld CUDA threads emulated\n", K->device_branch ? "device" : "host",
                checks - before, failures - failed, K->threads_executed());
  }
  std::printf("%lld bitwise checks, %lld failures\n", checks, failures);
#if DIFFKERN_EMU_CPU_DRIVER
  std::printf("of which %lld against the CPU driver (csrc/torch/cpu/driver.h)\n", driver_checks);
#else
  std::printf("CPU driver comparison OFF: built without torch's c10 headers (DIFFKERN_TORCH_INCLUDE)\n");
#endif
  return failures == 0 ? 0 : 1;
}
