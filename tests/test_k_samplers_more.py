"""diffkern.samplers' two-stage and multistep k-diffusion samplers (DPM2, DPM2 ancestral,
LMS, DPM++ 2S ancestral, DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE): each equals a float64
copy of k-diffusion's loop (crowsonkb/k-diffusion ``sampling.py``, written out below; k
is not installed) with the same noise_sampler, called at the same places with the same
levels; the in-kernel noise paths are deterministic per generator / seed and keyed
noise is batch-invariant; per-sample schedules equal per-sample runs; the wrappers' raw
outputs folded into the coefficients give the unfused numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen, max_rel_err, needs_cuda

import diffkern as dk
from diffkern import _rng
from diffkern import samplers as S

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only waits

F64 = torch.float64
S0 = 0.5  # data std of the toy denoiser
SHAPE = (3, 5, 7)


def toy_denoiser(x, sigma):
    """The exact denoiser of N(0, S0^2) data plus a small nonlinearity that vanishes at
    sigma = 0, evaluated in float64 and returned in x's dtype."""
    s = sigma.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    x64 = x.to(F64)
    return (x64 * S0**2 / (S0**2 + s**2) + 0.1 * torch.tanh(x64 / (1 + s)) * s / (1 + s)).to(x.dtype)


class SeqNoise:
    """A noise_sampler returning a fixed sequence of draws in call order (the n-th call
    gets the n-th draw of gen(seed)); records the levels it was called with."""

    def __init__(self, dtype, seed=0, shape=SHAPE):
        self.g, self.dtype, self.shape, self.calls = gen(seed), dtype, shape, []

    def __call__(self, sigma, sigma_next):
        self.calls.append(torch.stack([sigma, sigma_next]).double().reshape(2, -1).tolist())
        return torch.randn(self.shape, generator=self.g, dtype=F64).to(self.dtype)


def philox_randn(generator):
    """The churn draws diffkern makes from generator= (its Philox stream), for the oracle."""
    return lambda x: _rng.normal_like(x.shape, generator, "cpu", torch.float32).to(x.dtype)


# ---- k-diffusion's loops, as written there (float64 in these tests) -------------------------------
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


def k_dpm_2(model, x, sigmas, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., randn=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            eps = randn(x) * s_noise  # k-diffusion draws on every step; diffkern where it is used
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigma_hat
            dt_2 = sigmas[i + 1] - sigma_hat
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
    return x


def k_dpm_2_ancestral(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigma_down - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order, t, i, j):
    if order - 1 > i:
        raise ValueError(f'Order {order} too high for step {i}')

    def fn(tau):
        prod = 1.
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    try:
        from scipy import integrate
    except ImportError:  # without scipy: the polynomial integrated exactly
        p = np.polynomial.Polynomial.fit(np.linspace(t[i], t[i + 1], order + 1),
                                         [fn(v) for v in np.linspace(t[i], t[i + 1], order + 1)], order).integ()
        return p(t[i + 1]) - p(t[i])
    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def k_lms(model, x, sigmas, order=4):
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=False))
    return x


def k_dpmpp_2s_ancestral(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def k_dpmpp_sde(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None, r=1 / 2):
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)

            # Step 1
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in)

            # Step 2
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def k_dpmpp_2m_sde(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None, solver_type='midpoint'):
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                elif solver_type == 'midpoint':
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * \
                    s_noise
        old_denoised = denoised
        h_last = h
    return x


def k_dpmpp_3m_sde(model, x, sigmas, eta=1., s_noise=1., noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * \
                    (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
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


# ---- the cases: (id, ours(x, sigmas, noise_sampler), k's loop(x, sigmas, noise_sampler)) ----------
CASES = [
    ("dpm_2", lambda x, sg, ns: S.sample_dpm_2(toy_denoiser, x, sg, disable=True),
     lambda x, sg, ns: k_dpm_2(toy_denoiser, x, sg)),
    ("dpm_2-churn", lambda x, sg, ns: S.sample_dpm_2(toy_denoiser, x, sg, disable=True, s_churn=1.5, s_tmin=0.1,
                                                     s_tmax=5.0, s_noise=1.01, generator=gen(3)),
     lambda x, sg, ns: k_dpm_2(toy_denoiser, x, sg, s_churn=1.5, s_tmin=0.1, s_tmax=5.0, s_noise=1.01,
                               randn=philox_randn(gen(3)))),
    ("dpm_2_ancestral", lambda x, sg, ns: S.sample_dpm_2_ancestral(toy_denoiser, x, sg, disable=True,
                                                                   noise_sampler=ns),
     lambda x, sg, ns: k_dpm_2_ancestral(toy_denoiser, x, sg, noise_sampler=ns)),
    ("dpm_2_ancestral-eta", lambda x, sg, ns: S.sample_dpm_2_ancestral(toy_denoiser, x, sg, disable=True, eta=0.6,
                                                                       s_noise=1.02, noise_sampler=ns),
     lambda x, sg, ns: k_dpm_2_ancestral(toy_denoiser, x, sg, eta=0.6, s_noise=1.02, noise_sampler=ns)),
    # eta = 1.1: sigma_up = sigma_next, sigma_down = 0 from step 2 on (k's Euler branches mid-run)
    ("dpm_2_ancestral-eta1.1", lambda x, sg, ns: S.sample_dpm_2_ancestral(toy_denoiser, x, sg, disable=True, eta=1.1,
                                                                        noise_sampler=ns),
     lambda x, sg, ns: k_dpm_2_ancestral(toy_denoiser, x, sg, eta=1.1, noise_sampler=ns)),
    ("dpmpp_2s_ancestral-eta1.1", lambda x, sg, ns: S.sample_dpmpp_2s_ancestral(toy_denoiser, x, sg, disable=True,
                                                                              eta=1.1, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_2s_ancestral(toy_denoiser, x, sg, eta=1.1, noise_sampler=ns)),
    ("dpmpp_sde-eta1.1", lambda x, sg, ns: S.sample_dpmpp_sde(toy_denoiser, x, sg, disable=True, eta=1.1,
                                                            noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_sde(toy_denoiser, x, sg, eta=1.1, noise_sampler=ns)),
    ("lms", lambda x, sg, ns: S.sample_lms(toy_denoiser, x, sg, disable=True),
     lambda x, sg, ns: k_lms(toy_denoiser, x, sg)),
    ("lms-order2", lambda x, sg, ns: S.sample_lms(toy_denoiser, x, sg, disable=True, order=2),
     lambda x, sg, ns: k_lms(toy_denoiser, x, sg, order=2)),
    ("lms-order5", lambda x, sg, ns: S.sample_lms(toy_denoiser, x, sg, disable=True, order=5),
     lambda x, sg, ns: k_lms(toy_denoiser, x, sg, order=5)),
    ("dpmpp_2s_ancestral", lambda x, sg, ns: S.sample_dpmpp_2s_ancestral(toy_denoiser, x, sg, disable=True,
                                                                         noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_2s_ancestral(toy_denoiser, x, sg, noise_sampler=ns)),
    ("dpmpp_2s_ancestral-eta", lambda x, sg, ns: S.sample_dpmpp_2s_ancestral(
        toy_denoiser, x, sg, disable=True, eta=0.5, s_noise=0.97, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_2s_ancestral(toy_denoiser, x, sg, eta=0.5, s_noise=0.97, noise_sampler=ns)),
    ("dpmpp_sde", lambda x, sg, ns: S.sample_dpmpp_sde(toy_denoiser, x, sg, disable=True, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_sde(toy_denoiser, x, sg, noise_sampler=ns)),
    ("dpmpp_sde-eta-r", lambda x, sg, ns: S.sample_dpmpp_sde(toy_denoiser, x, sg, disable=True, eta=0.7, s_noise=1.03,
                                                             r=0.3, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_sde(toy_denoiser, x, sg, eta=0.7, s_noise=1.03, r=0.3, noise_sampler=ns)),
    ("dpmpp_sde-eta0", lambda x, sg, ns: S.sample_dpmpp_sde(toy_denoiser, x, sg, disable=True, eta=0.,
                                                            noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_sde(toy_denoiser, x, sg, eta=0., noise_sampler=ns)),
    ("dpmpp_2m_sde", lambda x, sg, ns: S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_2m_sde(toy_denoiser, x, sg, noise_sampler=ns)),
    ("dpmpp_2m_sde-heun", lambda x, sg, ns: S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True, noise_sampler=ns,
                                                                  solver_type='heun'),
     lambda x, sg, ns: k_dpmpp_2m_sde(toy_denoiser, x, sg, noise_sampler=ns, solver_type='heun')),
    ("dpmpp_2m_sde-heun-eta", lambda x, sg, ns: S.sample_dpmpp_2m_sde(
        toy_denoiser, x, sg, disable=True, eta=0.4, s_noise=1.05, noise_sampler=ns, solver_type='heun'),
     lambda x, sg, ns: k_dpmpp_2m_sde(toy_denoiser, x, sg, eta=0.4, s_noise=1.05, noise_sampler=ns,
                                      solver_type='heun')),
    ("dpmpp_2m_sde-eta0", lambda x, sg, ns: S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True, eta=0.,
                                                                  noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_2m_sde(toy_denoiser, x, sg, eta=0., noise_sampler=ns)),
    ("dpmpp_3m_sde", lambda x, sg, ns: S.sample_dpmpp_3m_sde(toy_denoiser, x, sg, disable=True, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_3m_sde(toy_denoiser, x, sg, noise_sampler=ns)),
    ("dpmpp_3m_sde-eta", lambda x, sg, ns: S.sample_dpmpp_3m_sde(toy_denoiser, x, sg, disable=True, eta=0.6,
                                                                 s_noise=0.98, noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_3m_sde(toy_denoiser, x, sg, eta=0.6, s_noise=0.98, noise_sampler=ns)),
    ("dpmpp_3m_sde-eta0", lambda x, sg, ns: S.sample_dpmpp_3m_sde(toy_denoiser, x, sg, disable=True, eta=0.,
                                                                  noise_sampler=ns),
     lambda x, sg, ns: k_dpmpp_3m_sde(toy_denoiser, x, sg, eta=0., noise_sampler=ns)),
]
NOISY = {"dpm_2_ancestral": lambda x, sg, **kw: S.sample_dpm_2_ancestral(toy_denoiser, x, sg, disable=True, **kw),
         "dpm_2-churn": lambda x, sg, **kw: S.sample_dpm_2(toy_denoiser, x, sg, disable=True, s_churn=1.5, **kw)}
NOISY["dpmpp_2s_ancestral"] = lambda x, sg, **kw: S.sample_dpmpp_2s_ancestral(toy_denoiser, x, sg, disable=True, **kw)
NOISY["dpmpp_sde"] = lambda x, sg, **kw: S.sample_dpmpp_sde(toy_denoiser, x, sg, disable=True, **kw)
NOISY["dpmpp_2m_sde"] = lambda x, sg, **kw: S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True, **kw)
NOISY["dpmpp_2m_sde-heun"] = lambda x, sg, **kw: S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True,
                                                                      solver_type='heun', **kw)
NOISY["dpmpp_3m_sde"] = lambda x, sg, **kw: S.sample_dpmpp_3m_sde(toy_denoiser, x, sg, disable=True, **kw)
DETERMINISTIC = {"dpm_2": lambda x, sg, **kw: S.sample_dpm_2(toy_denoiser, x, sg, disable=True, **kw),
                 "lms": lambda x, sg, **kw: S.sample_lms(toy_denoiser, x, sg, disable=True, **kw)}

SIGMAS = S.get_sigmas_karras(7, 0.03, 14.6)  # float32, as k-diffusion makes them


def x_start(sigma, seed=1, shape=SHAPE):
    return torch.randn(shape, generator=gen(seed), dtype=F64) * sigma


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_equals_k_diffusion_in_float64(case):
    _, ours, oracle = case
    sigmas = SIGMAS.to(F64)
    x = x_start(float(sigmas[0]))
    ns_ours, ns_k = SeqNoise(F64), SeqNoise(F64)
    got = ours(x, sigmas, ns_ours)
    want = oracle(x, sigmas, ns_k)
    assert got.dtype == F64
    assert max_rel_err(got, want) <= 1e-12
    # the noise sampler is called where k-diffusion calls it, with the same levels
    assert len(ns_ours.calls) == len(ns_k.calls)
    if ns_k.calls:
        np.testing.assert_allclose(ns_ours.calls, ns_k.calls, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_float32_within_1e5_of_float64_k_diffusion(case):
    _, ours, oracle = case
    x = x_start(float(SIGMAS[0])).float()
    got = ours(x, SIGMAS, SeqNoise(torch.float32))
    want = oracle(x.double(), SIGMAS.double(), SeqNoise(F64))
    assert got.dtype == torch.float32
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_result_dtype_is_k_diffusions(case):
    # float32 x with float64 sigmas: k's to_d (a dimensioned sigma) promotes x to float64 in
    # the branches that use it, its 0-d scalars do not
    _, ours, oracle = case
    x = x_start(float(SIGMAS[0])).float()
    got = ours(x, SIGMAS.to(F64), SeqNoise(torch.float32))
    want = oracle(x, SIGMAS.to(F64), SeqNoise(torch.float32))
    assert got.dtype == want.dtype
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", sorted(NOISY) + sorted(DETERMINISTIC))
def test_non_contiguous_x_gives_the_same_numbers(name):
    run = {**NOISY, **DETERMINISTIC}[name]
    x = x_start(float(SIGMAS[0]), shape=(3, 7, 5)).float()
    view = x.transpose(1, 2)  # (3, 5, 7), not contiguous
    kw = {"seeds": torch.tensor([1, 2, 3])} if name in NOISY else {}
    assert not view.is_contiguous()
    assert max_rel_err(run(view, SIGMAS, **kw), run(view.contiguous(), SIGMAS, **kw)) <= _tol()


@pytest.mark.parametrize("name", sorted(NOISY))
def test_generator_noise_is_deterministic_and_seeded(name):
    run = NOISY[name]
    x = x_start(float(SIGMAS[0])).float()
    a, b = run(x, SIGMAS, generator=gen(5)), run(x, SIGMAS, generator=gen(5))
    c = run(x, SIGMAS, generator=gen(6))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def _tol():
    return 0 if not dk.native_available() else 1e-6


@pytest.mark.parametrize("name", sorted(NOISY))
def test_keyed_noise_is_batch_invariant(name):
    run = NOISY[name]
    x = x_start(float(SIGMAS[0])).float()
    seeds = torch.tensor([11, 22, 33])
    got = run(x, SIGMAS, seeds=seeds)
    for b in range(SHAPE[0]):
        assert max_rel_err(got[b:b + 1], run(x[b:b + 1], SIGMAS, seeds=seeds[b:b + 1])) <= _tol(), b
    assert (got[0] - run(x, SIGMAS, seeds=torch.tensor([12, 22, 33]))[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(NOISY) + sorted(DETERMINISTIC))
def test_per_sample_sigmas_equal_per_sample_runs(name):
    run = {**NOISY, **DETERMINISTIC}[name]
    cols = [S.get_sigmas_karras(6, 0.02 + 0.01 * k, 10.0 + 2 * k) for k in range(SHAPE[0])]
    sigmas = torch.stack(cols, dim=1)  # (n+1, B)
    x = (x_start(1.0) * sigmas[0].double()[:, None, None]).float()
    seeds = torch.tensor([5, 6, 7])
    kw = (lambda b: {"seeds": seeds if b is None else seeds[b:b + 1]}) if name in NOISY else (lambda b: {})
    got = run(x, sigmas, **kw(None))
    for b in range(SHAPE[0]):
        assert max_rel_err(got[b:b + 1], run(x[b:b + 1], cols[b], **kw(b))) <= _tol(), b


def test_dpm_2_ancestral_at_eta_0_is_dpm_2():
    x = x_start(float(SIGMAS[0]))
    sg = SIGMAS.to(F64)
    got = S.sample_dpm_2_ancestral(toy_denoiser, x, sg, disable=True, eta=0., generator=gen(1))
    assert max_rel_err(got, S.sample_dpm_2(toy_denoiser, x, sg, disable=True)) <= 1e-12


def test_dpmpp_2m_sde_at_eta_0_is_dpmpp_2m():
    # the midpoint form at eta = 0 is DPM-Solver++(2M), the ODE solver
    x = x_start(float(SIGMAS[0]))
    sg = SIGMAS.to(F64)
    got = S.sample_dpmpp_2m_sde(toy_denoiser, x, sg, disable=True, eta=0.)
    assert max_rel_err(got, k_dpmpp_2m(toy_denoiser, x, sg)) <= 1e-12
    assert max_rel_err(got, S.sample_dpmpp_2m(toy_denoiser, x, sg, disable=True)) <= 1e-12


@pytest.mark.parametrize("sampler", [S.sample_dpmpp_sde, S.sample_dpmpp_2s_ancestral, S.sample_dpmpp_2m_sde,
                                     S.sample_dpmpp_3m_sde], ids=lambda f: f.__name__)
def test_eta_0_draws_nothing(sampler):
    # eta = 0: the noise coefficients are 0, so nothing is drawn: any generator, same result
    x = x_start(float(SIGMAS[0]))
    a = sampler(toy_denoiser, x, SIGMAS.to(F64), disable=True, eta=0., generator=gen(1))
    assert torch.equal(a, sampler(toy_denoiser, x, SIGMAS.to(F64), disable=True, eta=0., generator=gen(2)))


# ---- the wrappers' raw outputs, folded into the coefficients --------------------------------------
SCHED = dk.NoiseSchedule.scaled_linear()


def eps_model(x_in, t):
    return 0.3 * torch.tanh(x_in) + 1e-4 * t.reshape(-1, *([1] * (x_in.dim() - 1)))


FUSED = [
    ("dpm_2", lambda w, x, sg, **kw: S.sample_dpm_2(w, x, sg, disable=True, **kw)),
    ("dpm_2_ancestral", lambda w, x, sg, **kw: S.sample_dpm_2_ancestral(w, x, sg, disable=True,
                                                                        noise_sampler=SeqNoise(F64), **kw)),
    ("lms", lambda w, x, sg, **kw: S.sample_lms(w, x, sg, disable=True, **kw)),
    ("dpmpp_sde", lambda w, x, sg, **kw: S.sample_dpmpp_sde(w, x, sg, disable=True, noise_sampler=SeqNoise(F64), **kw)),
    ("dpmpp_2m_sde", lambda w, x, sg, **kw: S.sample_dpmpp_2m_sde(w, x, sg, disable=True, noise_sampler=SeqNoise(F64),
                                                                  **kw)),
    ("dpmpp_2m_sde-heun", lambda w, x, sg, **kw: S.sample_dpmpp_2m_sde(
        w, x, sg, disable=True, noise_sampler=SeqNoise(F64), solver_type='heun', **kw)),
    ("dpmpp_3m_sde", lambda w, x, sg, **kw: S.sample_dpmpp_3m_sde(w, x, sg, disable=True, noise_sampler=SeqNoise(F64),
                                                                  **kw)),
    ("dpmpp_2s_ancestral", lambda w, x, sg, **kw: S.sample_dpmpp_2s_ancestral(w, x, sg, disable=True,
                                                                              noise_sampler=SeqNoise(F64), **kw)),
]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("wrapper", [S.EpsDenoiser, S.VDenoiser], ids=["eps", "v"])
@pytest.mark.parametrize("case", FUSED, ids=lambda c: c[0])
def test_wrapped_models_fused_equal_unfused(case, wrapper, per_sample):
    # without a callback the raw eps / v goes to linear_step with the conversion folded in;
    # with one the sampler calls the wrapper for the denoised sample, as k-diffusion does
    _, run = case
    w = wrapper(eps_model, SCHED).double()
    sigmas = w.get_sigmas(6).double()
    x = x_start(float(sigmas[0]))
    if per_sample:  # a (n+1, B) schedule: the folded coefficients go per sample
        sigmas = sigmas[:, None] * torch.tensor([1.0, 0.8, 0.6], dtype=F64)
    seen = []
    fused = run(w, x, sigmas)
    unfused = run(w, x, sigmas, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(len(sigmas) - 1))
    assert max_rel_err(fused, unfused) <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_one_linear_step_per_model_evaluation(case, monkeypatch):
    import diffkern.k_samplers as K

    _, ours, _ = case
    counts = {"model": 0, "linear_step": 0}
    real, denoiser = K.linear_step, toy_denoiser

    def counting_step(*a, **kw):
        counts["linear_step"] += 1
        return real(*a, **kw)

    def counting_model(x, sigma):
        counts["model"] += 1
        return denoiser(x, sigma)

    monkeypatch.setattr(K, "linear_step", counting_step)
    monkeypatch.setitem(globals(), "toy_denoiser", counting_model)  # the cases look it up when they run
    sigmas = SIGMAS.to(F64)
    ours(x_start(float(sigmas[0])), sigmas, SeqNoise(F64))
    assert counts["linear_step"] == counts["model"] >= len(sigmas) - 1


def _cuda_syncs(fn):
    """(fn(), the host syncs it made) by torch's sync debug mode."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out, [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.is_available() and not dk.native_available("cuda"), reason="native CUDA ops not built")
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("name", sorted(NOISY) + sorted(DETERMINISTIC))
def test_cuda_no_host_sync_per_step(name, per_sample):
    # the host copy of sigmas is made once per call: the syncs must not grow with the steps
    # (k-diffusion's `if sigmas[i + 1] == 0` syncs on every step); and CUDA == CPU
    run = {**NOISY, **DETERMINISTIC}[name]
    counts = []
    for n in (4, 9):
        sg = (torch.stack([S.get_sigmas_karras(n, 0.03 + 0.01 * k, 14.6 - k) for k in range(3)], 1) if per_sample
              else S.get_sigmas_karras(n, 0.03, 14.6)).double()
        x = x_start(14.6)
        kw = {"seeds": torch.tensor([5, 6, 7])} if name in NOISY else {}
        xc, sgc, kwc = x.cuda(), sg.cuda(), {k: v.cuda() for k, v in kw.items()}
        out, syncs = _cuda_syncs(lambda: run(xc, sgc, **kwc))  # noqa: B023 (called at once)
        counts.append(len(syncs))
        # float64 arithmetic agrees to rounding; the keyed normals do not: their transforms
        # (log, sincos in float32) round differently on the two devices, up to 1e-5 at unit
        # scale (test_keyed_noise's device rule), so a noisy run is held to that
        noisy = name in NOISY or "churn" in name
        assert max_rel_err(out, run(x, sg, **kw)) <= (1e-5 if noisy else 1e-12)
    assert counts[0] == counts[1], syncs


def test_bad_arguments():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise_sampler"):
        S.sample_dpm_2_ancestral(toy_denoiser, x, SIGMAS, disable=True, seeds=torch.tensor([1, 2, 3]),
                                 noise_sampler=SeqNoise(F64))
    mixed = torch.stack([SIGMAS, SIGMAS], dim=1)
    mixed[-2, 1] = 0.0
    with pytest.raises(ValueError, match="same step|agree"):
        S.sample_dpm_2(toy_denoiser, x[:2], mixed, disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        S.sample_dpmpp_2m_sde(toy_denoiser, x, SIGMAS, disable=True, solver_type='euler')
    for order in (0, 6):
        with pytest.raises(ValueError, match="order"):
            S.sample_lms(toy_denoiser, x, SIGMAS, disable=True, order=order)


def test_lms_coefficients_are_k_diffusions_integrals():
    # Gauss-Legendre on the Lagrange basis = k-diffusion's quad, at every step and order
    from diffkern.k_samplers import _lms_coeffs

    sig = SIGMAS.double().numpy()
    for order in (1, 2, 3, 4, 5):
        table = _lms_coeffs(sig, order)
        for i, row in enumerate(table):
            want = [linear_multistep_coeff(min(i + 1, order), sig, i, j) for j in range(min(i + 1, order))]
            np.testing.assert_allclose(row, want, rtol=1e-12, atol=1e-12 * abs(sig[i + 1] - sig[i]))

