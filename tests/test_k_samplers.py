"""diffkern.samplers' k-diffusion samplers: each equals a float64 run of k-diffusion's own
loop (written out below, as crowsonkb/k-diffusion's sampling.py runs it; k-diffusion is
not installed) on an exact Gaussian denoiser; per-sample schedules equal per-sample
loops; the samplers end with the data variance; flow Euler and LCM equal diffusers'
schedulers on their own schedules; the denoiser wrappers follow k-diffusion's
DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, max_rel_err

import diffkern as dk
from diffkern import _rng
from diffkern import samplers as S

F64 = torch.float64
S_DATA = 0.7  # data std: x0 ~ N(0, S_DATA^2 I)
SHAPE = (6, 3, 5)


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] for Gaussian data, computed in float64."""
    sigma = sigma.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    return (x.to(F64) * S_DATA**2 / (S_DATA**2 + sigma**2)).to(x.dtype)


def keyed_noise_sampler(batch, dtype):
    """noise_sampler(sigma, sigma_next) for a batch of ``batch``: a pure function of the
    levels (as k-diffusion's BrownianTreeNoiseSampler is), so the caller's order does not
    matter; with (B,) levels, row k depends on level k only, so a per-sample loop sees
    the same noise as the batch."""
    def sample(sigma, sigma_next):
        lv = sigma.reshape(-1)
        per = lv.numel() > 1
        rows = [torch.randn(SHAPE[1:], dtype=F64,
                            generator=gen(int(float(lv[k] if per else lv[0]) * 1e6) + (0 if per else 7919 * k)))
                for k in range(batch)]
        return torch.stack(rows).to(dtype)
    return sample


def x_start(sigma_max, seed=0, n=SHAPE[0]):
    return torch.randn(n, *SHAPE[1:], generator=gen(seed), dtype=F64) * sigma_max


# ---- k-diffusion's loops, float64, as written there ----------------------------------------------
def append_dims(x, n):
    return x[(...,) + (None,) * (n - x.ndim)]


def to_d(x, sigma, denoised):
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def k_euler(model, x, sigmas, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., randn=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = randn(x) * s_noise  # k-diffusion draws on every step; diffkern where it is used
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat * s_in, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def k_euler_ancestral(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i] * s_in, denoised)
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def k_heun(model, x, sigmas, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., randn=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = randn(x) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat * s_in, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1] * s_in, denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


def k_dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def k_lcm(model, x, sigmas, noise_sampler):  # ComfyUI's k_diffusion sample_lcm, VE noise_scaling
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1]) + x
    return x


def philox_randn(generator):
    """The draws diffkern makes from generator= (its Philox stream), for the oracle."""
    return lambda x: _rng.normal_like(x.shape, generator, "cpu", torch.float32).to(x.dtype)


def philox_noise_sampler(x):
    """The oracle's noise_sampler for a sampler given generator=gen(3): the same draws."""
    randn = philox_randn(gen(3))
    return lambda sigma, sigma_next: randn(x)


SIGMAS = S.get_sigmas_karras(12, 0.03, 14.6)  # float32, as k-diffusion makes them
SIGMAS_EXP = S.get_sigmas_exponential(20, 0.05, 10.0)


# ---- every sampler = k-diffusion's loop in float64 -------------------------------------------------
CASES = [
    ("euler", lambda x, sg, g: S.sample_euler(gaussian_denoiser, x, sg, disable=True),
     lambda x, sg: k_euler(gaussian_denoiser, x, sg)),
    ("euler-churn", lambda x, sg, g: S.sample_euler(gaussian_denoiser, x, sg, disable=True, s_churn=2.0, s_tmin=0.1,
                                                    s_tmax=5.0, s_noise=1.01, generator=g),
     lambda x, sg: k_euler(gaussian_denoiser, x, sg, s_churn=2.0, s_tmin=0.1, s_tmax=5.0, s_noise=1.01,
                           randn=philox_randn(gen(3)))),
    ("euler-ancestral", lambda x, sg, g: S.sample_euler_ancestral(
        gaussian_denoiser, x, sg, disable=True, eta=0.8, s_noise=1.02,
        noise_sampler=keyed_noise_sampler(x.shape[0], x.dtype)),
     lambda x, sg: k_euler_ancestral(gaussian_denoiser, x, sg, eta=0.8, s_noise=1.02,
                                     noise_sampler=keyed_noise_sampler(x.shape[0], F64))),
    ("euler-ancestral-in-kernel", lambda x, sg, g: S.sample_euler_ancestral(gaussian_denoiser, x, sg, disable=True,
                                                                            generator=g),
     lambda x, sg: k_euler_ancestral(gaussian_denoiser, x, sg, noise_sampler=philox_noise_sampler(x))),
    ("heun", lambda x, sg, g: S.sample_heun(gaussian_denoiser, x, sg, disable=True),
     lambda x, sg: k_heun(gaussian_denoiser, x, sg)),
    ("heun-churn", lambda x, sg, g: S.sample_heun(gaussian_denoiser, x, sg, disable=True, s_churn=1.0, generator=g),
     lambda x, sg: k_heun(gaussian_denoiser, x, sg, s_churn=1.0, randn=philox_randn(gen(3)))),
    ("dpmpp-2m", lambda x, sg, g: S.sample_dpmpp_2m(gaussian_denoiser, x, sg, disable=True),
     lambda x, sg: k_dpmpp_2m(gaussian_denoiser, x, sg)),
    ("lcm", lambda x, sg, g: S.sample_lcm(gaussian_denoiser, x, sg, disable=True,
                                          noise_sampler=keyed_noise_sampler(x.shape[0], x.dtype)),
     lambda x, sg: k_lcm(gaussian_denoiser, x, sg, keyed_noise_sampler(x.shape[0], F64))),
    ("lcm-in-kernel", lambda x, sg, g: S.sample_lcm(gaussian_denoiser, x, sg, disable=True, generator=g),
     lambda x, sg: k_lcm(gaussian_denoiser, x, sg, philox_noise_sampler(x))),
]


@pytest.mark.parametrize("sigmas", [SIGMAS, SIGMAS_EXP], ids=["karras12", "exponential20"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_sampler_equals_k_diffusion_loop_in_float64(case, sigmas):
    _, ours, oracle = case
    x = x_start(float(sigmas[0]))
    got = ours(x.float(), sigmas, gen(3))
    want = oracle(x, sigmas.to(F64))
    assert got.dtype == torch.float32
    assert max_rel_err(got, want) <= 1e-5


def test_sampler_runs_in_float64_too():
    x = x_start(float(SIGMAS[0]))
    got = S.sample_dpmpp_2m(gaussian_denoiser, x, SIGMAS.to(F64), disable=True)
    assert got.dtype == F64 and max_rel_err(got, k_dpmpp_2m(gaussian_denoiser, x, SIGMAS.to(F64))) < 1e-12


def test_callback_and_progress_bar():
    seen = []
    x = x_start(float(SIGMAS[0])).float()
    out = S.sample_heun(gaussian_denoiser, x, SIGMAS, callback=seen.append, disable=False)
    assert [c["i"] for c in seen] == list(range(len(SIGMAS) - 1))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert max_rel_err(out, k_heun(gaussian_denoiser, x.double(), SIGMAS.double())) <= 1e-5


# ---- per-sample schedules = per-sample loops ------------------------------------------------------
PER_SAMPLE = [
    ("euler", lambda x, sg: S.sample_euler(gaussian_denoiser, x, sg, disable=True)),
    ("euler-ancestral", lambda x, sg: S.sample_euler_ancestral(gaussian_denoiser, x, sg, disable=True,
                                                               noise_sampler=keyed_noise_sampler(x.shape[0], x.dtype))),
    ("heun", lambda x, sg: S.sample_heun(gaussian_denoiser, x, sg, disable=True)),
    ("dpmpp-2m", lambda x, sg: S.sample_dpmpp_2m(gaussian_denoiser, x, sg, disable=True)),
    ("flow-euler", lambda x, sg: S.sample_flow_euler(flow_velocity, x, sg, disable=True)),
    ("lcm", lambda x, sg: S.sample_lcm(gaussian_denoiser, x, sg, disable=True,
                                       noise_sampler=keyed_noise_sampler(x.shape[0], x.dtype))),
]


@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c[0])
def test_per_sample_sigmas_equal_per_sample_loops(case):
    _, run = case
    B = SHAPE[0]
    if case[0] == "flow-euler":
        cols = [torch.linspace(1.0, 0.0, 11) ** (1 + 0.2 * k) for k in range(B)]
    else:
        cols = [S.get_sigmas_karras(10, 0.02 + 0.01 * k, 10.0 + 2 * k) for k in range(B)]
    sigmas = torch.stack(cols, dim=1)  # (n+1, B)
    x = (x_start(1.0) * (sigmas[0].double()[:, None, None])).float()
    got = run(x, sigmas)
    for k in range(B):
        one = run(x[k:k + 1], cols[k])
        tol = 0 if not dk.native_available() else 1e-6
        assert max_rel_err(got[k:k + 1], one) <= tol, k


def test_per_sample_sigmas_must_reach_zero_together():
    sigmas = torch.stack([S.get_sigmas_karras(4, 0.1, 5.0), torch.tensor([5.0, 2.0, 1.0, 0.0, 0.0])], dim=1)
    with pytest.raises(ValueError, match="same step"):
        S.sample_heun(gaussian_denoiser, torch.randn(2, 3), sigmas, disable=True)
    with pytest.raises(ValueError, match="batch size"):
        S.sample_euler(gaussian_denoiser, torch.randn(3, 3), sigmas, disable=True)


# ---- quality: the data variance at the end --------------------------------------------------------
def _chain_variance(sigmas, kind):
    """The exact variance the discretized Euler / Euler-ancestral chain ends with for
    Gaussian data (the steps are linear in x): v' = a^2 v + sigma_up^2."""
    s = sigmas.double().tolist()
    v = s[0] ** 2 + S_DATA**2
    for a, b in zip(s[:-1], s[1:], strict=True):
        down, up = get_ancestral_step(a, b) if kind == "ancestral" else (b, 0.0)
        f = 1 + a * (down - a) / (S_DATA**2 + a * a)
        v = f * f * v + (up * up if b > 0 else 0.0)
    return v


QUALITY = [
    ("euler", 300, lambda x, sg: S.sample_euler(gaussian_denoiser, x, sg, disable=True)),
    ("euler-ancestral", 600, lambda x, sg: S.sample_euler_ancestral(
        gaussian_denoiser, x, sg, disable=True, noise_sampler=lambda a, b: torch.randn(x.shape, generator=G_Q))),
    ("heun", 30, lambda x, sg: S.sample_heun(gaussian_denoiser, x, sg, disable=True)),
    ("dpmpp-2m", 30, lambda x, sg: S.sample_dpmpp_2m(gaussian_denoiser, x, sg, disable=True)),
]
G_Q = gen(77)


@pytest.mark.parametrize("case", QUALITY, ids=lambda c: c[0])
def test_samplers_end_with_the_data_variance(case):
    name, n, run = case
    N = 10_000
    sigmas = S.get_sigmas_karras(n, 0.002, 80.0)
    z = torch.randn(N, 1, generator=gen(5), dtype=F64)
    z = (z - z.mean()) / z.std()  # the start has exactly the marginal variance at sigma_max
    G_Q.manual_seed(78)
    out = run((z * math.sqrt(80.0**2 + S_DATA**2)).float(), sigmas).double()
    ratio = out.var().item() / S_DATA**2
    assert abs(ratio - 1) < 0.05, (name, ratio)
    assert abs(out.mean().item()) < 4 * S_DATA / math.sqrt(N)
    if name.startswith("euler"):
        # and with the variance of its own discretization, within 4 standard errors of a
        # variance estimate from N samples (the ancestral noise makes it random)
        chain = _chain_variance(sigmas, "ancestral" if "ancestral" in name else "ode") / S_DATA**2
        assert abs(ratio - chain) < 4 * math.sqrt(2 / N) * chain, (name, ratio, chain)


# ---- the denoiser wrappers -------------------------------------------------------------------------
SCHED = dk.NoiseSchedule.scaled_linear()
AC = SCHED.alphas_cumprod


class ExactEps(torch.nn.Module):
    """The exact epsilon (or v) of Gaussian data on the VP state at fractional t, with
    sigma(t) interpolated in log sigma as k-diffusion's t_to_sigma does."""

    def __init__(self, wrapper_cls, v=False):
        super().__init__()
        self.schedule = wrapper_cls(None, SCHED)
        self.v = v
        self.calls = []

    def forward(self, x_vp, t):
        self.calls.append(t)
        sigma = append_dims(self.schedule.t_to_sigma(t).to(F64), x_vp.ndim)
        ab = 1 / (1 + sigma**2)
        xv = x_vp.to(F64)
        var = ab * S_DATA**2 + 1 - ab
        eps = (1 - ab).sqrt() * xv / var
        if not self.v:
            return eps.to(x_vp.dtype)
        x0 = ab.sqrt() * S_DATA**2 * xv / var
        return (ab.sqrt() * eps - (1 - ab).sqrt() * x0).to(x_vp.dtype)


def test_discrete_schedule_follows_k_diffusion():
    w = S.EpsDenoiser(None, SCHED)
    sig = ((1 - AC) / AC) ** 0.5
    assert torch.equal(w.sigmas, sig) and torch.equal(w.log_sigmas, sig.log())
    assert w.sigma_min == sig[0] and w.sigma_max == sig[-1]
    # sigma_to_t: exact on the table, linear in log sigma between entries
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.allclose(w.sigma_to_t(sig[t]), t.float(), atol=1e-3, rtol=0)
    mid = (sig[10].log() * 0.25 + sig[11].log() * 0.75).exp()
    assert abs(float(w.sigma_to_t(mid.reshape(1))) - 10.75) < 1e-3
    assert int(w.sigma_to_t(mid.reshape(1), quantize=True)) == 11
    assert w.sigma_to_t(sig[t], quantize=True).dtype == torch.int64
    # t_to_sigma interpolates in log sigma; get_sigmas(n) visits linspace(T-1, 0, n), then 0
    assert torch.allclose(w.t_to_sigma(torch.tensor([10.75])), mid.reshape(1), rtol=1e-5)
    g = w.get_sigmas(7)
    want = torch.cat([w.t_to_sigma(torch.linspace(999, 0, 7)), torch.zeros(1)])
    assert torch.equal(g, want) and g[-1] == 0
    assert torch.allclose(g[[0, -2]], sig[[-1, 0]], rtol=1e-6, atol=0)
    assert torch.equal(w.get_sigmas(), torch.cat([sig.flip(0), torch.zeros(1)]))


@pytest.mark.parametrize("wrapper", [S.EpsDenoiser, S.VDenoiser], ids=["eps", "v"])
def test_wrappers_are_k_diffusions_denoisers(wrapper):
    model = ExactEps(wrapper, v=wrapper is S.VDenoiser)
    w = wrapper(model, SCHED)
    x = torch.randn(SHAPE, generator=gen(8)) * 3
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 10.0])
    den = w(x, sigma)
    # k-diffusion's forward, written out: c_in = 1/sqrt(sigma^2+1); eps: x - sigma eps; v: v c_out + x c_skip
    s4 = append_dims(sigma, 3)
    m = model(x / (s4**2 + 1).sqrt(), w.sigma_to_t(sigma))
    k = x - s4 * m if wrapper is S.EpsDenoiser else m * (-s4 / (s4**2 + 1).sqrt()) + x / (s4**2 + 1)
    assert max_rel_err(den, k) < 1e-6
    assert max_rel_err(den, gaussian_denoiser(x.double(), sigma)) < 1e-5  # the model is exact
    assert torch.is_floating_point(model.calls[0]) and not torch.is_floating_point(
        wrapper(model, SCHED, quantize=True).sigma_to_t(sigma))


@pytest.mark.parametrize("wrapper", [S.EpsDenoiser, S.VDenoiser], ids=["eps", "v"])
@pytest.mark.parametrize("sampler", [S.sample_euler, S.sample_euler_ancestral, S.sample_heun, S.sample_dpmpp_2m],
                         ids=lambda f: f.__name__)
def test_wrapped_models_sample_fused_as_unfused(wrapper, sampler):
    # Without a callback the samplers hand the raw eps / v to the ops (prediction_type=);
    # with one they call the wrapper for the denoised sample, as k-diffusion does. Same
    # numbers; and both equal k-diffusion's loop on the exact Gaussian denoiser.
    w = wrapper(ExactEps(wrapper, v=wrapper is S.VDenoiser), SCHED)
    sigmas = w.get_sigmas(15)
    x = (x_start(1.0) * float(sigmas[0])).float()
    kw = {"noise_sampler": keyed_noise_sampler(SHAPE[0], torch.float32)} if sampler is S.sample_euler_ancestral else {}
    fused = sampler(w, x, sigmas, disable=True, **kw)
    unfused = sampler(w, x, sigmas, disable=True, callback=lambda d: None, **kw)
    assert max_rel_err(fused, unfused) < 1e-5
    okw = {"noise_sampler": keyed_noise_sampler(SHAPE[0], F64)} if sampler is S.sample_euler_ancestral else {}
    oracle = {S.sample_euler: k_euler, S.sample_euler_ancestral: k_euler_ancestral, S.sample_heun: k_heun,
              S.sample_dpmpp_2m: k_dpmpp_2m}[sampler]
    # sigma -> t -> sigma runs through float32 log-sigma interpolation in the wrapper: 1e-4
    assert max_rel_err(fused, oracle(gaussian_denoiser, x.double(), sigmas.double(), **okw)) < 1e-4


def test_wrapper_rejects_bad_schedules():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        S.EpsDenoiser(None, dk.NoiseSchedule.linear(rescale_zero_terminal_snr=True))
    with pytest.raises(TypeError, match="schedule"):
        S.VDenoiser(None, "linear")


# ---- flow matching vs diffusers' FlowMatchEulerDiscreteScheduler -----------------------------------
def flow_velocity(x, sigma):
    """E[z - x0 | (1 - sigma) x0 + sigma z = x] for Gaussian data, in float64."""
    s = sigma.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * S_DATA**2 + s**2
    return ((s - (1 - s) * S_DATA**2) * x.to(F64) / var).to(x.dtype)


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_euler_equals_diffusers_flow_match_euler(stochastic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    sched.set_timesteps(20)
    x0 = torch.randn(SHAPE, generator=gen(9))
    g = gen(10)
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        v = flow_velocity(x, sched.sigmas[i].reshape(1).expand(x.shape[0]))
        x = sched.step(v, t, x, generator=g).prev_sample
    g2 = gen(10)
    ours = S.sample_flow_euler(flow_velocity, x0, sched.sigmas, disable=True, stochastic=stochastic,
                               noise_sampler=lambda a, b: torch.randn(SHAPE, generator=g2))
    assert max_rel_err(ours, x) <= 1e-5
    # in-kernel noise: the same loop with the Philox draws of generator= (one per step)
    if stochastic:
        randn, xs = philox_randn(gen(15)), x0.double()
        for i in range(20):
            s, s_next = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
            x0_hat = xs - s * flow_velocity(xs, s.reshape(1).expand(SHAPE[0]))
            xs = (1 - s_next) * x0_hat + s_next * randn(xs)
        ours = S.sample_flow_euler(flow_velocity, x0, sched.sigmas, disable=True, stochastic=True, generator=gen(15))
        assert max_rel_err(ours, xs) <= 1e-5
    # and the per-step op with per-sample sigma
    if not stochastic:
        xs, s = x0.clone(), sched.sigmas
        for i in range(20):
            xs = dk.flow_step(xs, flow_velocity(xs, s[i].expand(SHAPE[0])), s[i].expand(SHAPE[0]),
                              s[i + 1].expand(SHAPE[0]))
        assert max_rel_err(xs, x) <= 1e-5


# ---- LCM vs diffusers' LCMScheduler ------------------------------------------------------------------
def exact_eps_vp(x_vp, t, ac):
    ab = ac.to(F64)[t].reshape(-1, *([1] * (x_vp.dim() - 1)))
    return ((1 - ab).sqrt() * x_vp.to(F64) / (ab * S_DATA**2 + 1 - ab)).to(x_vp.dtype)


def test_lcm_equals_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(20)
    ts = sched.timesteps.tolist()
    ours_sched = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    assert torch.equal(ours_sched.alphas_cumprod, sched.alphas_cumprod)
    x_T = torch.randn(SHAPE, generator=gen(11))
    g = gen(12)
    x = x_T.clone()
    for t in sched.timesteps:
        x, den = sched.step(exact_eps_vp(x, int(t), sched.alphas_cumprod), t, x, generator=g, return_dict=False)
    # diffusers draws randn(shape, generator) on every step but the last
    g2 = gen(12)
    noises = [torch.randn(SHAPE, generator=g2) for _ in ts[:-1]]

    # 1. the op, step by step (t_prev = -1 at the end), per-sample t
    xs = x_T.clone()
    B = SHAPE[0]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((B,), t)
        xs = dk.lcm_step(xs, exact_eps_vp(xs, tt, sched.alphas_cumprod), tt, torch.full((B,), t_prev),
                         schedule=ours_sched, noise=noises[i] if t_prev >= 0 else None)
    assert max_rel_err(xs, x) <= 1e-5

    # 2. sample_lcm on the VE state with an LCM denoiser (the consistency boundary condition)
    w = S.EpsDenoiser(None, ours_sched, quantize=True)

    def lcm_denoiser(x_ve, sigma):
        t = w.sigma_to_t(sigma)
        s4 = append_dims(sigma, x_ve.ndim).to(F64)
        x_vp = x_ve.to(F64) / (1 + s4**2).sqrt()
        x0 = x_ve.to(F64) - s4 * exact_eps_vp(x_vp, t, sched.alphas_cumprod).to(F64)
        u = append_dims(t.to(F64) * 10.0, x_ve.ndim)
        c_skip, c_out = 0.25 / (u**2 + 0.25), u / (u**2 + 0.25).sqrt()
        return (c_out * x0 + c_skip * x_vp).to(x_ve.dtype)

    sig = w.sigmas[torch.tensor(ts)]
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    it = iter(noises)
    ours = S.sample_lcm(lcm_denoiser, x_T * (1 + sig[0] ** 2).sqrt(), sigmas, disable=True,
                        noise_sampler=lambda a, b: next(it))
    assert max_rel_err(ours, x) <= 1e-5


# ---- k-diffusion's schedule helpers ------------------------------------------------------------------
def test_schedule_helpers_are_k_diffusions():
    n, smin, smax, rho = 10, 0.03, 14.6, 7.0
    ramp = torch.linspace(0, 1, n)
    want = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = S.get_sigmas_karras(n, smin, smax, rho)
    assert got.dtype == torch.float32 and got.shape == (n + 1,)
    assert torch.equal(got[:-1], want) and got[-1] == 0
    e = S.get_sigmas_exponential(n, smin, smax)
    assert torch.equal(e[:-1], torch.linspace(math.log(smax), math.log(smin), n).exp()) and e[-1] == 0
    assert S.get_ancestral_step(2.0, 1.0, eta=0) == (1.0, 0.0)
    down, up = S.get_ancestral_step(2.0, 1.0)
    assert abs(down**2 + up**2 - 1.0) < 1e-15 and abs(up - math.sqrt(0.75)) < 1e-15
    x, d = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(S.to_d(x, torch.tensor([1.0, 2.0, 4.0]), d), (x - d) / torch.tensor([[1.0], [2.0], [4.0]]))
    assert torch.equal(S.append_zero(torch.ones(2)), torch.tensor([1.0, 1.0, 0.0]))


# ---- a real network: the digits UNet samples with every family through the wrappers ----------------
@pytest.mark.parametrize("wrapper", [S.EpsDenoiser, S.VDenoiser], ids=["eps", "v"])
def test_unet_samples_with_every_family(wrapper, one_thread):
    from diffkern.models import UNet

    torch.manual_seed(0)
    unet = UNet(1, base_channels=8, num_res_blocks=1, num_classes=10).eval()
    w = wrapper(unet, SCHED)
    sigmas = w.get_sigmas(4)
    x = torch.randn(2, 1, 8, 8, generator=gen(13)) * sigmas[0]
    extra = {"y": torch.tensor([3, 7])}
    for sampler in (S.sample_euler, S.sample_euler_ancestral, S.sample_heun, S.sample_dpmpp_2m, S.sample_lcm):
        kw = {"generator": gen(14)} if sampler in (S.sample_euler_ancestral, S.sample_lcm) else {}
        fused = sampler(w, x, sigmas, extra_args=extra, disable=True, **kw)
        kw = {"generator": gen(14)} if kw else {}
        unfused = sampler(w, x, sigmas, extra_args=extra, disable=True, callback=lambda d: None, **kw)
        assert fused.shape == x.shape and torch.isfinite(fused).all()
        assert max_rel_err(fused, unfused) < 1e-5, sampler.__name__
