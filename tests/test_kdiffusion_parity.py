"""diffkern.samplers against k-diffusion itself (tests/_kdiffusion_oracle.py: k-diffusion's
sampling.py / external.py statement by statement): same model (an exact Gaussian
denoiser and a small random nonlinear network taking extra_args), same sigmas (Karras,
exponential, the wrappers' get_sigmas), same noise (noise_sampler, or the churn draws fed
to k-diffusion's torch.randn_like), same callbacks, same dtypes, same signatures.

Tolerances (max|diffkern - k| / max|k|): 1e-12 in float64, 1e-5 in float32. Where x is
float64 but sigmas float32, k-diffusion forms dt / sigma_up / h in float32 and diffkern in
float64 (k_samplers' docstring): there diffkern equals k-diffusion run on the float64
values of the same sigmas to 1e-12, and k-diffusion as run to 1e-6.
"""

from __future__ import annotations

import inspect

import _kdiffusion_oracle as K
import pytest
import torch
from conftest import gen, max_rel_err

import diffkern as dk
from diffkern import k_samplers
from diffkern import samplers as S

F32, F64 = torch.float32, torch.float64
TOL = {F32: 1e-5, F64: 1e-12}
SHAPE = (4, 3, 5)
S_DATA2 = 0.49  # data variance of the Gaussian denoiser
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6


def gaussian(x, sigma, **kwargs):
    """E[x0 | x] for x0 ~ N(0, S_DATA2 I), in the dtypes k-diffusion hands it."""
    return x * S_DATA2 / (S_DATA2 + K.append_dims(sigma, x.ndim) ** 2)


class Net(torch.nn.Module):
    """A small random nonlinear model: out = f(x, sigma-or-t; cond, scale), float64 inside,
    returned in x's dtype (so a float32 x sees float32 outputs)."""

    def __init__(self, seed=3, time_input=False):
        super().__init__()
        g = gen(seed)
        d = SHAPE[1] * SHAPE[2]
        self.w1 = torch.randn(d, 16, generator=g, dtype=F64) / d**0.5
        self.w2 = torch.randn(16, d, generator=g, dtype=F64) / 4
        self.ws = torch.randn(16, generator=g, dtype=F64)
        self.time_input = time_input

    def forward(self, x, sigma, cond=None, scale=1.0):
        b = x.shape[0]
        f = x.reshape(b, -1).to(F64)
        s = sigma.reshape(b, 1).to(F64)
        s = s / 100 + 0.1 if self.time_input else s
        h = torch.tanh(f @ self.w1 / (1 + s) + s.log() * self.ws + (0 if cond is None else cond.to(F64)))
        out = f / (1 + s**2) + scale * (h @ self.w2) * s / (1 + s)
        return out.reshape(x.shape).to(x.dtype)


def extra_args():
    return {"cond": torch.randn(16, generator=gen(11), dtype=F64), "scale": 0.7}


def x_start(dtype, seed=1):
    return (torch.randn(SHAPE, generator=gen(seed), dtype=F64) * SIGMA_MAX).to(dtype)


def sigma_schedule(kind, dtype):
    if kind == "karras":
        s = K.get_sigmas_karras(7, SIGMA_MIN, SIGMA_MAX)
    elif kind == "karras_rho3":
        s = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX, rho=3.)  # ratios > 2: float32 dt rounds
    elif kind == "exponential":
        s = K.get_sigmas_exponential(6, SIGMA_MIN, SIGMA_MAX)
    else:  # the wrappers' own schedule
        s = K.DiscreteEpsDDPMDenoiser(None, dk.NoiseSchedule.linear().alphas_cumprod, False).get_sigmas(8)
    return s.to(dtype)


def keyed_noise(dtype):
    """noise_sampler(sigma, sigma_next): a pure function of the levels, as a Brownian tree."""
    def sample(sigma, sigma_next):
        return torch.randn(SHAPE, generator=gen(int(float(sigma) * 1e6) ^ int(float(sigma_next) * 1e3)),
                           dtype=F64).to(dtype)
    return sample


MODELS = {"gaussian": lambda: (gaussian, {}), "net": lambda: (Net(), extra_args())}
DETERMINISTIC = ("sample_euler", "sample_heun", "sample_dpmpp_2m")


# ---- signatures and schedules ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
                                  "get_sigmas_karras", "get_sigmas_exponential", "to_d", "get_ancestral_step",
                                  "append_zero", "default_noise_sampler"])
def test_signatures_are_k_diffusions(name):
    """k-diffusion's parameters, in order, kinds and defaults; diffkern's extras keyword-only."""
    ours = list(inspect.signature(getattr(S, name)).parameters.values())
    theirs = list(inspect.signature(getattr(K, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == \
        [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in ours[len(theirs):])


@pytest.mark.parametrize("name", ["get_sigmas", "sigma_to_t", "t_to_sigma"])
def test_wrapper_method_signatures_are_k_diffusions(name):
    ours = inspect.signature(getattr(S.DiscreteSchedule, name))
    theirs = inspect.signature(getattr(K.DiscreteSchedule, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    assert k_samplers.DiscreteEpsDDPMDenoiser is S.EpsDenoiser and k_samplers.DiscreteVDDPMDenoiser is S.VDenoiser


@pytest.mark.parametrize("n,rho", [(1, 7.), (2, 7.), (7, 7.), (25, 7.), (10, 3.), (33, 1.)])
def test_sigma_schedules_are_k_diffusions(n, rho):
    assert torch.equal(S.get_sigmas_karras(n, 0.0292, 14.6146, rho), K.get_sigmas_karras(n, 0.0292, 14.6146, rho))
    assert torch.equal(S.get_sigmas_exponential(n, 0.0292, 14.6146), K.get_sigmas_exponential(n, 0.0292, 14.6146))
    s = torch.rand(n, dtype=F64) + 0.1
    assert torch.equal(S.append_zero(s), K.append_zero(s))
    for a, b in ((s[0], s[-1] / 2), (3.0, 1.5), (s[0], 0.0)):
        for eta in (1., 0.6, 0.):
            assert S.get_ancestral_step(a, b, eta) == K.get_ancestral_step(a, b, eta)
    x, den = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    sig3 = torch.rand(3, dtype=F64) + 0.1
    assert torch.equal(S.to_d(x, sig3, den), K.to_d(x, sig3, den))


# ---- the loops ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("sigmas", ["karras", "karras_rho3", "exponential", "wrapper"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_equal_k_diffusion(name, model, sigmas, dtype):
    m, ea = MODELS[model]()
    sig, x = sigma_schedule(sigmas, dtype), x_start(dtype)
    ours = getattr(S, name)(m, x, sig, extra_args=ea, disable=True)
    theirs = getattr(K, name)(m, x, sig, extra_args=ea, disable=True)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert max_rel_err(ours, theirs) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("eta,s_noise", [(1., 1.), (0.6, 1.3), (0., 1.), (1.4, 0.8)])
@pytest.mark.parametrize("model", list(MODELS))
def test_euler_ancestral_equals_k_diffusion(model, eta, s_noise, dtype):
    m, ea = MODELS[model]()
    sig, x = sigma_schedule("karras", dtype), x_start(dtype)
    calls = {"ours": [], "theirs": []}

    def noise(who):
        ns = keyed_noise(dtype)

        def sample(sigma, sigma_next):
            calls[who].append((float(sigma), float(sigma_next)))
            return ns(sigma, sigma_next)
        return sample
    ours = S.sample_euler_ancestral(m, x, sig, extra_args=ea, eta=eta, s_noise=s_noise, noise_sampler=noise("ours"))
    theirs = K.sample_euler_ancestral(m, x, sig, extra_args=ea, eta=eta, s_noise=s_noise,
                                      noise_sampler=noise("theirs"))
    assert calls["ours"] == calls["theirs"] and len(calls["ours"]) == len(sig) - 2  # not at sigma_next = 0
    assert ours.dtype == theirs.dtype == dtype
    assert max_rel_err(ours, theirs) <= TOL[dtype]


def churned_steps(sigmas, s_churn, s_tmin, s_tmax):
    n = len(sigmas) - 1
    return [i for i in range(n) if s_churn > 0 and bool(s_tmin <= sigmas[i] <= s_tmax)]  # in sigmas' dtype


def drawn(generator, dtype):
    """The next x-shaped in-kernel draw of ``generator``, as the ops draw it (native or
    reference): langevin_step from 0 with a zero score and sqrt(2 step_size) = 1."""
    zero = torch.zeros(SHAPE, dtype=dtype)
    return dk.langevin_step(zero, zero.new_zeros(()).expand(SHAPE), 0.5, generator=generator)


def _window_edges(sig):
    """(s_tmin, s_tmax) just inside sig[1] and sig[3] in float64, on them once rounded to
    float32: k-diffusion compares a float32 sigma with the float32-rounded bounds."""
    lo, hi = float(sig[3]), float(sig[1])
    return lo * (1 + 2.0**-26), hi * (1 - 2.0**-26)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("s_churn,s_tmin,s_tmax,s_noise", [(1.0, 0., float('inf'), 1.), (20., 0.5, 5., 1.007),
                                                            (3.0, 0.05, 1.0, 0.9), (2.0, 100., 200., 1.),
                                                            (2.0, "edge", "edge", 1.)])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_churn_equals_k_diffusion_on_the_same_draws(name, model, s_churn, s_tmin, s_tmax, s_noise, dtype,
                                                    monkeypatch):
    """diffkern draws one x-shaped Philox draw per churned step from ``generator``; fed those
    draws through torch.randn_like (called on every step there), k-diffusion agrees."""
    m, ea = MODELS[model]()
    sig, x = sigma_schedule("karras", dtype), x_start(dtype)
    if s_tmin == "edge":
        s_tmin, s_tmax = _window_edges(sig)
        assert churned_steps(sig, s_churn, s_tmin, s_tmax) == ([1, 2, 3] if dtype == F32 else [2])
    kw = dict(extra_args=ea, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    g = gen(77)
    ours = getattr(S, name)(m, x, sig, generator=g, **kw)
    replay = gen(77)
    churned = churned_steps(sig, s_churn, s_tmin, s_tmax)
    draws = [drawn(replay, dtype) if i in churned else torch.zeros(SHAPE, dtype=dtype) for i in range(len(sig) - 1)]
    assert torch.equal(g.get_state(), replay.get_state())  # exactly one draw per churned step
    it = iter(draws)
    monkeypatch.setattr(torch, "randn_like", lambda t: next(it))
    theirs = getattr(K, name)(m, x, sig, **kw)
    monkeypatch.undo()
    assert next(it, None) is None
    assert ours.dtype == theirs.dtype == dtype
    assert max_rel_err(ours, theirs) <= TOL[dtype]
    if not churned:  # nothing drawn: the plain loop
        assert torch.equal(ours, getattr(S, name)(m, x, sig, extra_args=ea))


# ---- callbacks, disable=, return values ----------------------------------------------------------
def _record(log):
    return lambda d: log.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})


@pytest.mark.parametrize("name,kw", [("sample_euler", {}), ("sample_euler", dict(s_churn=2.0, s_tmin=0.1, s_tmax=8.)),
                                     ("sample_heun", dict(s_churn=1.0)), ("sample_dpmpp_2m", {}),
                                     ("sample_euler_ancestral", dict(eta=0.7))])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_callback_receives_what_k_diffusion_passes(name, kw, dtype, monkeypatch):
    m, ea = Net(), extra_args()
    sig, x = sigma_schedule("exponential", dtype), x_start(dtype)
    if name == "sample_euler_ancestral":
        kw = dict(kw, noise_sampler=keyed_noise(dtype))
    ours_log, theirs_log = [], []
    g = gen(5)
    ours = getattr(S, name)(m, x, sig, extra_args=ea, callback=_record(ours_log), disable=False,
                            **(dict(kw, generator=g) if "s_churn" in kw else kw))
    if "s_churn" in kw:
        replay = gen(5)
        churned = churned_steps(sig, kw["s_churn"], kw.get("s_tmin", 0.), kw.get("s_tmax", float('inf')))
        it = iter([drawn(replay, dtype) if i in churned else torch.zeros(SHAPE) for i in range(len(sig) - 1)])
        monkeypatch.setattr(torch, "randn_like", lambda t: next(it))
    theirs = getattr(K, name)(m, x, sig, extra_args=ea, callback=_record(theirs_log), **kw)
    monkeypatch.undo()
    assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype
    assert max_rel_err(ours, theirs) <= TOL[dtype]
    assert len(ours_log) == len(theirs_log) == len(sig) - 1
    for a, b in zip(ours_log, theirs_log, strict=True):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        for k in ("x", "sigma", "sigma_hat", "denoised"):
            assert isinstance(a[k], torch.Tensor) and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].device == b[k].device
            if k in ("sigma", "sigma_hat"):
                assert torch.equal(a[k], b[k]), (k, a[k], b[k])
            else:
                assert max_rel_err(a[k], b[k]) <= TOL[dtype], k


@pytest.mark.parametrize("disable", [None, True, False])
def test_disable_is_accepted_and_changes_nothing(disable):
    sig, x = sigma_schedule("karras", F64), x_start(F64)
    for name in DETERMINISTIC:
        out = getattr(S, name)(gaussian, x, sig, disable=disable)
        assert torch.equal(out, getattr(S, name)(gaussian, x, sig, disable=True))
        assert max_rel_err(out, getattr(K, name)(gaussian, x, sig, disable=disable)) <= TOL[F64]


# ---- dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"])
def test_mixed_dtypes_follow_k_diffusion(name):
    """float32 x with float64 sigmas: k-diffusion's to_d promotes x to float64 (not in
    DPM++(2M)); float64 x with float32 sigmas: x stays float64, and only k-diffusion's
    float32 step scalars differ from diffkern's float64 ones."""
    kw = {"noise_sampler": keyed_noise(F32)} if name == "sample_euler_ancestral" else {}
    run_s, run_k = getattr(S, name), getattr(K, name)
    sig32 = sigma_schedule("karras_rho3", F32)
    x32 = x_start(F32)
    ours, theirs = run_s(gaussian, x32, sig32.double(), **kw), run_k(gaussian, x32, sig32.double(), **kw)
    assert ours.dtype == theirs.dtype
    assert max_rel_err(ours, theirs) <= 1e-6  # the first step's x - denoised is float32 in k-diffusion
    x64 = x_start(F64)
    if kw:  # float32 noise would be rounded to float32 after * sigma_up in k-diffusion (0-d sigma_up)
        kw = {"noise_sampler": keyed_noise(F64)}
    ours = run_s(gaussian, x64, sig32, **kw)
    assert ours.dtype == run_k(gaussian, x64, sig32, **kw).dtype == F64
    assert max_rel_err(ours, run_k(gaussian, x64, sig32.double(), **kw)) <= TOL[F64]
    assert max_rel_err(ours, run_k(gaussian, x64, sig32, **kw)) <= 1e-6


# ---- the denoiser wrappers --------------------------------------------------------------------
def _ac(dtype):
    return dk.NoiseSchedule.scaled_linear().alphas_cumprod.to(dtype)


@pytest.mark.parametrize("ac_dtype", [F32, F64])
@pytest.mark.parametrize("quantize", [False, True])
def test_discrete_schedule_equals_k_diffusions(quantize, ac_dtype):
    ac = _ac(ac_dtype)
    ours, theirs = S.EpsDenoiser(None, ac, quantize), K.DiscreteEpsDDPMDenoiser(None, ac, quantize)
    for a, b in ((ours.sigmas, theirs.sigmas), (ours.log_sigmas, theirs.log_sigmas),
                 (ours.sigma_min, theirs.sigma_min), (ours.sigma_max, theirs.sigma_max),
                 (ours.get_sigmas(), theirs.get_sigmas()), (ours.get_sigmas(9), theirs.get_sigmas(9)),
                 (ours.get_sigmas(1000), theirs.get_sigmas(1000))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for sdt in (F32, F64):
        # per-sample (B,) and 0-d sigmas, between, on and outside the table's levels
        for sigma in (torch.tensor([0.02, 0.0292, 0.5, 1.7, 14.6, 20.0], dtype=sdt), torch.tensor(3.3, dtype=sdt),
                      theirs.sigmas[[0, 17, 999]].to(sdt), torch.rand(7, generator=gen(2), dtype=sdt) * 10 + 0.01):
            for q in (None, True, False):
                a, b = ours.sigma_to_t(sigma, q), theirs.sigma_to_t(sigma, q)
                assert a.dtype == b.dtype and a.shape == b.shape == sigma.shape and torch.equal(a, b)
    for t in (torch.tensor([0., 3.5, 998.9, 999.]), torch.tensor([12, 500]), torch.tensor(41.25, dtype=F64)):
        a, b = ours.t_to_sigma(t), theirs.t_to_sigma(t)
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_wrappers_equal_k_diffusions_denoisers(kind, quantize, dtype):
    inner, ac = Net(seed=8, time_input=True), _ac(F32)
    ours = (S.EpsDenoiser if kind == "eps" else S.VDenoiser)(inner, ac, quantize)
    theirs = (K.DiscreteEpsDDPMDenoiser if kind == "eps" else K.DiscreteVDDPMDenoiser)(inner, ac, quantize)
    x = x_start(dtype)
    sigma = torch.tensor([0.04, 0.9, 3.0, 14.0], dtype=dtype)  # per sample
    a, b = ours(x, sigma, **extra_args()), theirs(x, sigma, **extra_args())
    assert a.dtype == b.dtype and max_rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"])
def test_wrapped_models_sample_as_in_k_diffusion(name, kind, dtype):
    """The fused prediction_type path (no callback) against k-diffusion's wrapper + loop."""
    inner, ac = Net(seed=9, time_input=True), _ac(F32)
    ours = (S.EpsDenoiser if kind == "eps" else S.VDenoiser)(inner, ac)
    theirs = (K.DiscreteEpsDDPMDenoiser if kind == "eps" else K.DiscreteVDDPMDenoiser)(inner, ac, False)
    sig = theirs.get_sigmas(6).to(dtype)
    x = x_start(dtype) * float(sig[0]) / SIGMA_MAX
    kw = {"noise_sampler": keyed_noise(dtype), "eta": 0.8} if name == "sample_euler_ancestral" else {}
    a = getattr(S, name)(ours, x, sig, extra_args=extra_args(), **kw)
    b = getattr(K, name)(theirs, x, sig, extra_args=extra_args(), **kw)
    assert a.dtype == b.dtype and max_rel_err(a, b) <= TOL[dtype]


# ---- drawn noise ------------------------------------------------------------------------------
def test_default_generator_is_used_as_the_other_ops_use_it():
    """noise_sampler=None, generator=None: the draws come from torch's default generator,
    keyed as every diffkern op keys it (the same as a generator seeded like it)."""
    sig, x = torch.tensor([2.0, 1.0, 0.0], dtype=F64), x_start(F64)
    zero = lambda x, sigma: torch.zeros_like(x)  # noqa: E731  (denoised 0: x1 = x sd/s + su z)
    torch.manual_seed(123)
    out_default = S.sample_euler_ancestral(zero, x, sig[:2].contiguous())
    out_gen = S.sample_euler_ancestral(zero, x, sig[:2].contiguous(), generator=gen(123))
    assert torch.equal(out_default, out_gen)
    sd, su = K.get_ancestral_step(sig[0], sig[1])
    z = (out_default - x * sd / sig[0]) / su
    torch.manual_seed(123)
    _, z_op = dk.flow_q_sample(torch.zeros(SHAPE, dtype=F64), 1.0)  # another op's first default draw
    # the same stream: equal up to one float32 ulp where one side is native and one is not
    assert max_rel_err(z, z_op) <= 2.0**-22
    # the churn draws too
    torch.manual_seed(9)
    a = S.sample_euler(gaussian, x, sig, s_churn=1.0)
    assert torch.equal(a, S.sample_euler(gaussian, x, sig, s_churn=1.0, generator=gen(9)))


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m"])
def test_no_churn_draws_no_noise(name):
    sig, x = sigma_schedule("karras", F32), x_start(F32)
    g = gen(4)
    kws = [{}] if name == "sample_dpmpp_2m" else [{}, dict(s_churn=0.), dict(s_churn=5.0, s_tmin=50., s_tmax=60.),
                                                    dict(s_churn=5.0, s_noise=0.5, s_tmax=0.01)]
    for kw in kws:
        before, gbefore = torch.random.get_rng_state(), g.get_state()
        out = getattr(S, name)(gaussian, x, sig, **kw)
        out_g = getattr(S, name)(gaussian, x, sig, generator=g, **kw) if kw else out
        assert torch.equal(torch.random.get_rng_state(), before), kw
        assert torch.equal(g.get_state(), gbefore), kw
        assert torch.equal(out, out_g) and max_rel_err(out, getattr(K, name)(gaussian, x, sig)) <= TOL[F32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_x_with_float32_sigmas_leaves_in_float32_as_k_diffusion(dtype):
    """k-diffusion's first Euler/Heun/ancestral update promotes a half x with float32 sigmas
    (to_d's append_dims(sigma)); DPM++(2M) keeps x's dtype."""
    sig, x = sigma_schedule("karras", F32), x_start(dtype)
    for name in ("sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"):
        kw = {"noise_sampler": keyed_noise(dtype)} if name == "sample_euler_ancestral" else {}
        ours, theirs = getattr(S, name)(gaussian, x, sig, **kw), getattr(K, name)(gaussian, x, sig, **kw)
        assert ours.dtype == theirs.dtype == (dtype if name == "sample_dpmpp_2m" else F32), name
        # k-diffusion rounds every intermediate to the half dtype (DPM++(2M): on every step,
        # the others: on the first step), diffkern once per step: a few half ulps
        assert max_rel_err(ours, theirs) <= 4 * torch.finfo(dtype).eps, name
