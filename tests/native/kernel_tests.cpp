// Host tests of the framework-free kernel headers: Philox known-answer vectors, noise
// statistics and keying, and the step coefficients against their closed forms.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "kernels/gmm.h"
#include "kernels/philox.h"
#include "kernels/schedule.h"

using namespace diffkern;

static int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      ++failures;                                          \
    }                                                      \
  } while (0)

static void test_philox_kat() {
  struct Kat {
    uint32_t c[4], k[2], out[4];
  } kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const Uint4 r = philox4x32_10(Uint4{t.c[0], t.c[1], t.c[2], t.c[3]}, t.k[0], t.k[1]);
    CHECK(r.x == t.out[0] && r.y == t.out[1] && r.z == t.out[2] && r.w == t.out[3],
          "philox KAT: got %08x %08x %08x %08x", r.x, r.y, r.z, r.w);
  }
  // The counter layout (torch's curand_init(seed, subsequence = group, offset)): offset/4 in
  // words 0-1, the group in words 2-3. Expected words from diffkern/_rng.py philox_bits.
  const uint64_t seed = 0x0123456789ABCDEFull, offset = 4ull * 0x1122334455ull, group = 0x99AABBCC0Dull;
  const Uint4 r = philox_bits(PhiloxKey{seed, offset}, group);
  CHECK(r.x == 0x7d2938b5u && r.y == 0x3de120f7u && r.z == 0xe690c17eu && r.w == 0x142936d5u,
        "philox_bits layout: got %08x %08x %08x %08x", r.x, r.y, r.z, r.w);
  const Uint4 d = philox4x32_10(Uint4{0x22334455u, 0x11u, 0xAABBCC0Du, 0x99u}, 0x89ABCDEFu, 0x01234567u);
  CHECK(d.x == r.x && d.y == r.y && d.z == r.z && d.w == r.w, "philox_bits counter words");
}

static void test_transcendentals() {
  double max_log = 0, max_sc = 0;
  for (uint32_t k = 0; k < (1u << 23); k += 97) {
    const float u = (float(k) + 0.5f) * 1.1920928955078125e-07f;
    max_log = std::fmax(max_log, std::fabs(double(log_poly(u)) - std::log(double(u))) / std::fabs(std::log(double(u))));
    const float v = float(k) * 1.1920928955078125e-07f;
    const Float2 sc = sincos_2pi(v);
    const float s = sc.a, c = sc.b;
    const double a = 2 * M_PI * double(v);
    max_sc = std::fmax(max_sc, std::fmax(std::fabs(s - std::sin(a)), std::fabs(c - std::cos(a))));
  }
  CHECK(max_log < 3e-7, "log_poly max relative error %g", max_log);
  CHECK(max_sc < 3e-7, "sincos_2pi max abs error %g", max_sc);
}

static void test_normals() {
  const PhiloxKey key{12345, 8};
  const int n = 1 << 20;
  double s1 = 0, s2 = 0, lag = 0, prev = 0;
  for (int i = 0; i < n; ++i) {
    const double z = philox_normal_at(key, uint64_t(i));
    s1 += z;
    s2 += z * z;
    lag += z * prev;
    prev = z;
  }
  const double mean = s1 / n, var = s2 / n - mean * mean;
  CHECK(std::fabs(mean) < 5 / std::sqrt(double(n)), "normal mean %g", mean);
  CHECK(std::fabs(var - 1) < 5 * std::sqrt(2.0 / n), "normal variance %g", var);
  CHECK(std::fabs(lag / n) < 5 / std::sqrt(double(n)), "lag-1 correlation %g", lag / n);
  // Keying: element i only depends on (seed, offset, i).
  const Float4 group5 = philox_normal4(key, 5);
  const float* z4 = group5.v;
  CHECK(z4[2] == philox_normal_at(key, 22), "group/lane keying");
  CHECK(philox_normal_at(PhiloxKey{12345, 12}, 22) != z4[2], "offset changes the stream");
  CHECK(philox_normal_at(PhiloxKey{12346, 8}, 22) != z4[2], "seed changes the stream");
}

static void test_coefficients() {
  // DDPM with t_prev = t-1 against the textbook posterior, DDIM eta=1 variance = beta_tilde.
  double ab = 0.6, abp = 0.62;
  const StepCoeffs<double> p = ddpm_coeffs<double>(ab, abp, 10, kFixedSmall, kEpsilon);
  const double a = ab / abp, b = 1 - a;
  const double x = 0.37, m = -1.3, z = 0.81;
  const double got = step_apply<double>(p, x, m, z, true, false, 0.0);
  const double want = (x - b / std::sqrt(1 - ab) * m) / std::sqrt(a) + std::sqrt((1 - abp) / (1 - ab) * b) * z;
  CHECK(std::fabs(got - want) < 1e-12, "ddpm step %.17g vs %.17g", got, want);
  const StepCoeffs<double> d = ddim_coeffs<double>(ab, abp, 1.0, kEpsilon);
  CHECK(std::fabs(d.std * d.std - (1 - abp) / (1 - ab) * b) < 1e-15, "ddim eta=1 variance");
  CHECK(std::fabs(d.c1 * d.c1 - (1 - abp - d.std * d.std)) < 1e-14, "ddim direction coefficient");
  const StepCoeffs<double> f = ddim_coeffs<double>(ab, 1.0, 1.0, kEpsilon);
  CHECK(f.std == 0 && f.c1 == 0 && f.c0 == 1, "final step (t_prev < 0) returns x0");
  CHECK(std::isnan(table_lookup<double>(nullptr, 10, 10, false)), "out-of-range t gives NaN");
}

static void test_exp_poly() {
  double worst = 0;
  for (float v = -80.0f; v <= 0.0f; v += 0.00731f)
    worst = std::fmax(worst, std::fabs(double(exp_poly(v)) - std::exp(double(v))) / std::exp(double(v)));
  CHECK(worst < 3e-7, "exp_poly max relative error %g", worst);
}

static void test_gmm_score() {
  // One component: score = (mu - x)/(s^2 + sigma^2).
  const double w[1] = {1.0}, mu[2] = {1.0, -2.0}, sd[2] = {0.5, 2.0};
  double iv[2], ln[1], score[2];
  gmm_component_constants<double>(w, sd, 0, 2, 1.5, iv, ln);
  const double x[2] = {0.3, 0.7};
  gmm_score_point<double>(x, 2, 1, mu, iv, ln, score);
  CHECK(std::fabs(score[0] - (1.0 - 0.3) / (0.25 + 2.25)) < 1e-14, "gmm score d0");
  CHECK(std::fabs(score[1] - (-2.0 - 0.7) / (4.0 + 2.25)) < 1e-14, "gmm score d1");
}

static void test_gmm_score_zero_weights_first() {
  // Components of weight 0 ahead of the others (log weight -inf): the score is the one of
  // the remaining mixture, not NaN (the streaming log-sum-exp gave exp(-inf + inf)).
  const double w[3] = {0.0, 0.0, 1.0}, mu[6] = {5, 5, -5, -5, 1.0, -2.0}, sd[6] = {1, 1, 1, 1, 0.5, 2.0};
  double iv[6], ln[3], score[2];
  for (int k = 0; k < 3; ++k) gmm_component_constants<double>(w, sd, k, 2, 1.5, iv, ln);
  const double x[2] = {0.3, 0.7};
  gmm_score_point<double>(x, 2, 3, mu, iv, ln, score);
  CHECK(std::fabs(score[0] - (1.0 - 0.3) / (0.25 + 2.25)) < 1e-14, "gmm score, zero weights first, d0: %g", score[0]);
  CHECK(std::fabs(score[1] - (-2.0 - 0.7) / (4.0 + 2.25)) < 1e-14, "gmm score, zero weights first, d1: %g", score[1]);
  float wf[3] = {0.0f, 0.5f, 0.5f}, muf[6] = {5, 5, -5, -5, 1, -2}, sdf[6] = {1, 1, 1, 1, 0.5f, 2}, ivf[6], lnf[3],
        sf[2];
  for (int k = 0; k < 3; ++k) gmm_component_constants<float>(wf, sdf, k, 2, 1.5f, ivf, lnf);
  const float xf[2] = {0.3f, 0.7f};
  gmm_score_point<float>(xf, 2, 3, muf, ivf, lnf, sf);
  CHECK(std::isfinite(sf[0]) && std::isfinite(sf[1]), "gmm score float, zero weight first: %g %g", sf[0], sf[1]);
}

static void test_no_sync_timestep_rules() {
  // A device-resident t_prev >= t, or epsilon prediction where alphas_cumprod[t] == 0: NaN
  // coefficients (the host rejects these when it can read t; the kernels cannot raise).
  const float table[3] = {0.9f, 0.5f, 0.0f};
  const int64_t t[1] = {1}, tp[1] = {1}, tz[1] = {2};
  const DdimOp same{TimestepArgs{table, 3, t, tp, 1}, 0.0, kEpsilon, false, 0.0};
  CHECK(std::isnan(same.coeffs<double>(0).c0), "t_prev == t gives NaN");
  const DdimOp zero_snr{TimestepArgs{table, 3, tz, nullptr, 1}, 0.0, kEpsilon, false, 0.0};
  const StepCoeffs<double> k = zero_snr.coeffs<double>(0);
  CHECK(std::isnan(step_apply<double>(k, 0.5, -0.25, 0.0, false, true, 1.0)), "epsilon at zero SNR gives NaN, clipped");
  const DdimOp v{TimestepArgs{table, 3, tz, nullptr, 1}, 0.0, kVPrediction, false, 0.0};
  CHECK(std::isfinite(step_apply<double>(v.coeffs<double>(0), 0.5, -0.25, 0.0, false, false, 0.0)),
        "v prediction at zero SNR is finite");
}

int main() {
  test_philox_kat();
  test_transcendentals();
  test_normals();
  test_coefficients();
  test_exp_poly();
  test_gmm_score();
  test_gmm_score_zero_weights_first();
  test_no_sync_timestep_rules();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernel_tests: all checks passed\n");
  return 0;
}
