"""dk.reference.* against closed-form float64 math written out here, independently of the
library's cancellation-free coefficient forms (REFERENCE_SEMANTICS.md)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PREDICTION_TYPES, ab_of, gen, max_rel_err, randn

import diffkern as dk

R = dk.reference
SCHED = dk.NoiseSchedule.linear()
F64 = torch.float64
SHAPE = (3, 4, 5)


# ---- closed forms (textbook, float64) ------------------------------------------------
def x0_eps_from_output(x, m, ab, prediction_type):
    if prediction_type == "epsilon":
        return (x - math.sqrt(1 - ab) * m) / math.sqrt(ab), m
    if prediction_type == "sample":
        return m, (x - math.sqrt(ab) * m) / math.sqrt(1 - ab)
    if prediction_type == "v_prediction":
        return math.sqrt(ab) * x - math.sqrt(1 - ab) * m, math.sqrt(ab) * m + math.sqrt(1 - ab) * x
    raise AssertionError(prediction_type)


def ddim_closed(x, m, t, t_prev, eta, z, prediction_type="epsilon", clip=None, sched=SCHED):
    ab, abp = ab_of(sched, t), ab_of(sched, t_prev)
    x0, eps = x0_eps_from_output(x, m, ab, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)
    std = eta * math.sqrt(var)
    return math.sqrt(abp) * x0 + math.sqrt(1 - abp - std**2) * eps + std * z


def ddpm_closed(x, m, t, t_prev, z, prediction_type="epsilon", clip=None, variance="fixed_small", sched=SCHED):
    ab, abp = ab_of(sched, t), ab_of(sched, t_prev)
    a_t = ab / abp
    b_t = 1 - a_t
    x0, _ = x0_eps_from_output(x, m, ab, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean = math.sqrt(abp) * b_t / (1 - ab) * x0 + math.sqrt(a_t) * (1 - abp) / (1 - ab) * x
    var = max((1 - abp) / (1 - ab) * b_t, 1e-20) if variance == "fixed_small" else b_t
    return mean + (math.sqrt(var) * z if t > 0 else 0.0)


def inputs(seed=0, shape=SHAPE, dtype=F64):
    return (randn(*shape, dtype=dtype, seed=seed), randn(*shape, dtype=dtype, seed=seed + 1),
            randn(*shape, dtype=dtype, seed=seed + 2))


# ---- DDPM ------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2, 10, 250, 500, 999])
def test_ddpm_step_tprev_t_minus_1_textbook(t):
    """Ho et al. Algorithm 2: (x - b_t/sqrt(1-ab) eps)/sqrt(a_t) + sqrt(beta_tilde) z."""
    x, eps, z = inputs(t)
    ab, abp = ab_of(SCHED, t), ab_of(SCHED, t - 1)
    a_t = ab / abp
    b_t = 1 - a_t
    beta_tilde = (1 - abp) / (1 - ab) * b_t
    expected = (x - b_t / math.sqrt(1 - ab) * eps) / math.sqrt(a_t) + math.sqrt(beta_tilde) * z
    got = R.ddpm_step(x, eps, t, noise=z)
    assert got.dtype == F64 and got.shape == x.shape
    assert max_rel_err(got, expected) <= 1e-9
    # t_prev given explicitly as t - 1 is the same step.
    assert torch.equal(R.ddpm_step(x, eps, t, t_prev=t - 1, noise=z), got)


def test_ddpm_step_t0_is_x0_without_noise():
    x, eps, z = inputs(7)
    ab = ab_of(SCHED, 0)
    expected = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    got1 = R.ddpm_step(x, eps, 0, noise=z)
    got2 = R.ddpm_step(x, eps, 0, noise=randn(*SHAPE, dtype=F64, seed=99))
    assert max_rel_err(got1, expected) <= 1e-9
    assert torch.equal(got1, got2)  # no noise at t == 0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.0, 0.3])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("t,t_prev", [(999, 979), (500, 499), (37, 12), (20, -1), (1, 0)])
def test_ddpm_step_closed_form(prediction_type, clip, variance, t, t_prev):
    x, m, z = inputs(t + 3 * (t_prev + 2))
    if prediction_type == "sample":
        m = m * 2.0  # x0 predictions outside [-clip, clip] for some entries
    expected = ddpm_closed(x, m, t, t_prev, z, prediction_type, clip, variance)
    got = R.ddpm_step(x, m, t, t_prev=t_prev, variance=variance, prediction_type=prediction_type,
                      clip_sample=clip, noise=z)
    assert max_rel_err(got, expected) <= 1e-9


# ---- DDIM ------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip", [None, 1.0, 0.3])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t,t_prev", [(999, 979), (500, 499), (37, 12), (20, -1), (1, 0)])
def test_ddim_step_closed_form(prediction_type, clip, eta, t, t_prev):
    x, m, z = inputs(t + 5 * (t_prev + 2))
    if prediction_type == "sample":
        m = m * 2.0
    expected = ddim_closed(x, m, t, t_prev, eta, z, prediction_type, clip)
    got = R.ddim_step(x, m, t, eta, t_prev=t_prev, prediction_type=prediction_type, clip_sample=clip, noise=z)
    assert got.dtype == F64 and got.shape == x.shape
    assert max_rel_err(got, expected) <= 1e-9


def test_clip_sample_true_means_one():
    x, m, z = inputs(11)
    a = R.ddim_step(x, m, 300, 0.5, t_prev=200, clip_sample=True, noise=z)
    b = R.ddim_step(x, m, 300, 0.5, t_prev=200, clip_sample=1.0, noise=z)
    c = R.ddim_step(x, m, 300, 0.5, t_prev=200, clip_sample=None, noise=z)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # clipping is active for these inputs


@pytest.mark.parametrize("t", [1, 5, 100, 700, 999])
def test_ddim_eta1_std_is_posterior_std(t):
    """The noise coefficient of DDIM(eta=1, t_prev=t-1) is sqrt(beta_tilde)."""
    x, eps, z1 = inputs(100 + t)
    z2 = randn(*SHAPE, dtype=F64, seed=500 + t)
    ab, abp = ab_of(SCHED, t), ab_of(SCHED, t - 1)
    beta_tilde = (1 - abp) / (1 - ab) * (1 - ab / abp)
    o1 = R.ddim_step(x, eps, t, 1.0, noise=z1)
    o2 = R.ddim_step(x, eps, t, 1.0, noise=z2)
    std = (o1 - o2) / (z1 - z2)
    assert torch.allclose(std, torch.full_like(std, math.sqrt(beta_tilde)), rtol=1e-7, atol=0)
    # and DDIM(eta=1) is the DDPM ancestral step with the posterior variance
    ddpm = R.ddpm_step(x, eps, t, variance="fixed_small", noise=z1)
    assert max_rel_err(o1, ddpm) <= 1e-9


@pytest.mark.parametrize("t,t_prev", [(999, 949), (500, 480), (10, 0), (3, -1)])
def test_ddim_eta0_deterministic_and_invertible(t, t_prev):
    x, eps, z = inputs(200 + t)
    # deterministic: neither the noise tensor nor the generator changes anything
    a = R.ddim_step(x, eps, t, 0.0, t_prev=t_prev, noise=z)
    b = R.ddim_step(x, eps, t, 0.0, t_prev=t_prev, noise=randn(*SHAPE, dtype=F64, seed=1))
    c = R.ddim_step(x, eps, t, 0.0, t_prev=t_prev, generator=gen(3))
    d = R.ddim_step(x, eps, t, 0.0, t_prev=t_prev, generator=gen(4))
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    # invert with the closed-form inverse x = sqrt(ab) x0' + sqrt(1-ab) eps,
    # x0' = (x' - sqrt(1-ab') eps) / sqrt(ab')
    ab, abp = ab_of(SCHED, t), ab_of(SCHED, t_prev)
    x0p = (a - math.sqrt(1 - abp) * eps) / math.sqrt(abp)
    back = math.sqrt(ab) * x0p + math.sqrt(1 - ab) * eps
    assert max_rel_err(back, x) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ddim_eta0_inverse_chain_float(dtype):
    """A whole 20-step DDIM chain inverted step by step returns to the start."""
    x = randn(2, 3, 8, dtype=dtype, seed=5)
    eps = randn(2, 3, 8, dtype=dtype, seed=6)
    ts = list(range(999, -1, -50)) + [-1]
    y = x
    for t, tp in zip(ts[:-1], ts[1:], strict=True):
        y = R.ddim_step(y, eps, t, 0.0, t_prev=tp)
    for t, tp in reversed(list(zip(ts[:-1], ts[1:], strict=True))):
        ab, abp = ab_of(SCHED, t), ab_of(SCHED, tp)
        y = math.sqrt(ab) * (y.double() - math.sqrt(1 - abp) * eps.double()) / math.sqrt(abp) \
            + math.sqrt(1 - ab) * eps.double()
    tol = 1e-9 if dtype == F64 else 1e-4
    assert max_rel_err(y, x) <= tol


# ---- q_sample ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 1, 400, 999])
def test_q_sample_closed_form(t):
    x0, z, _ = inputs(300 + t)
    ab = ab_of(SCHED, t)
    xt, n = R.q_sample(x0, t, z)
    assert n is z
    assert max_rel_err(xt, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * z) <= 1e-12


def test_q_sample_moments_1e6():
    """Over 1e6 draws per row: mean sqrt(ab) x0 and variance 1 - ab, four timesteps at once."""
    n = 250_000
    ts = torch.tensor([0, 100, 500, 999])
    c = torch.tensor([1.7, -0.6, 2.3, 0.9], dtype=F64)
    x0 = c[:, None].expand(4, n).contiguous()
    xt, noise = R.q_sample(x0, ts, generator=gen(1234))
    assert xt.shape == x0.shape and noise.shape == x0.shape
    for i, t in enumerate(ts.tolist()):
        ab = ab_of(SCHED, t)
        row = xt[i]
        var = 1 - ab
        se_mean = math.sqrt(var / n)
        assert abs(row.mean().item() - math.sqrt(ab) * c[i].item()) < 5 * se_mean, t
        assert abs(row.var().item() - var) < 5 * var * math.sqrt(2 / n), t
    # the returned noise is what was used
    assert max_rel_err(xt, torch.sqrt(SCHED.alphas_cumprod.double()[ts])[:, None] * x0
                       + torch.sqrt(1 - SCHED.alphas_cumprod.double()[ts])[:, None] * noise) <= 1e-6
    # and over all 1e6 values the noise is standard normal in its first two moments
    N = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(N)
    assert abs(noise.var().item() - 1) < 5 * math.sqrt(2 / N)


# ---- per-sample t --------------------------------------------------------------------
@pytest.mark.parametrize("op", ["q_sample", "ddim0", "ddim", "ddpm"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_per_sample_t_equals_loop_reference(op, dtype):
    B = 5
    x, m, z = inputs(400, shape=(B, 3, 4), dtype=dtype)
    t = torch.tensor([999, 3, 500, 0, 123])
    tp = torch.tensor([949, -1, 499, -1, 100])
    if op == "q_sample":
        batched = R.q_sample(x, t, z)[0]
        loop = [R.q_sample(x[i:i + 1], int(t[i]), z[i:i + 1])[0] for i in range(B)]
    elif op == "ddim0":
        batched = R.ddim_step(x, m, t, 0.0, t_prev=tp)
        loop = [R.ddim_step(x[i:i + 1], m[i:i + 1], int(t[i]), 0.0, t_prev=int(tp[i])) for i in range(B)]
    elif op == "ddim":
        batched = R.ddim_step(x, m, t, 0.7, t_prev=tp, prediction_type="v_prediction", noise=z)
        loop = [R.ddim_step(x[i:i + 1], m[i:i + 1], int(t[i]), 0.7, t_prev=int(tp[i]),
                            prediction_type="v_prediction", noise=z[i:i + 1]) for i in range(B)]
    else:
        batched = R.ddpm_step(x, m, t, t_prev=tp, clip_sample=1.0, noise=z)
        loop = [R.ddpm_step(x[i:i + 1], m[i:i + 1], int(t[i]), t_prev=int(tp[i]), clip_sample=1.0,
                            noise=z[i:i + 1]) for i in range(B)]
    assert torch.equal(batched, torch.cat(loop))


def test_per_sample_t_default_t_prev_and_0d_tensor():
    x, m, z = inputs(500, shape=(4, 6))
    t = torch.tensor([10, 20, 30, 40])
    batched = R.ddpm_step(x, m, t, noise=z)  # t_prev defaults to t - 1 per sample
    loop = torch.cat([R.ddpm_step(x[i:i + 1], m[i:i + 1], int(t[i]), noise=z[i:i + 1]) for i in range(4)])
    assert torch.equal(batched, loop)
    assert torch.equal(R.ddim_step(x, m, torch.tensor(30), 0.0), R.ddim_step(x, m, 30, 0.0))
    assert torch.equal(R.ddim_step(x, m, torch.tensor([30]), 0.0), R.ddim_step(x, m, 30, 0.0))


# ---- Langevin ------------------------------------------------------------------------
def test_langevin_step_closed_form():
    x, s, z = inputs(600)
    a = 0.037
    assert max_rel_err(R.langevin_step(x, s, a, noise=z), x + a * s + math.sqrt(2 * a) * z) <= 1e-14


# ---- schedules -----------------------------------------------------------------------
def _cumprod64(betas):
    return torch.cumprod(1 - betas.double(), 0)


def test_linear_schedule():
    s = dk.NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=F64)
    assert s.num_timesteps == 1000 and len(s) == 1000
    assert torch.allclose(s.betas.double(), betas, rtol=1e-6, atol=1e-9)
    assert torch.allclose(s.alphas.double(), 1 - betas, rtol=1e-6)
    assert torch.allclose(s.alphas_cumprod.double(), _cumprod64(betas), rtol=1e-5)
    assert s.alphas_cumprod.dtype == torch.float32
    # the default schedule is this one
    x, m, z = inputs(700)
    assert torch.equal(R.ddpm_step(x, m, 321, noise=z), R.ddpm_step(x, m, 321, noise=z, schedule=s))


def test_scaled_linear_schedule():
    s = dk.NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = torch.tensor([(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)], dtype=F64)
    assert torch.allclose(s.betas.double(), betas, rtol=1e-5)
    assert torch.allclose(s.alphas_cumprod.double(), _cumprod64(betas), rtol=1e-5)


def test_cosine_schedule():
    T, s_, mb = 1000, 0.008, 0.999
    s = dk.NoiseSchedule.cosine(T)

    def f(u):
        return math.cos((u / T + s_) / (1 + s_) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), mb) for i in range(T)], dtype=F64)
    assert float(betas.max()) == mb  # the cap is hit at the end
    assert torch.allclose(s.betas.double(), betas, rtol=1e-6, atol=1e-9)
    assert torch.allclose(s.alphas_cumprod.double(), _cumprod64(betas), rtol=1e-4, atol=1e-9)
    # the un-capped closed form alphas_cumprod = f(t+1)/f(0) holds before the cap
    acf = torch.tensor([f(i + 1) / f(0) for i in range(T)], dtype=F64)
    assert torch.allclose(s.alphas_cumprod.double()[:900], acf[:900], rtol=1e-4)


def test_from_betas_and_from_alphas_cumprod():
    betas = torch.linspace(2e-4, 0.03, 200, dtype=F64)
    a = dk.NoiseSchedule.from_betas(betas)
    assert torch.allclose(a.alphas_cumprod.double(), _cumprod64(betas), rtol=1e-5)
    b = dk.NoiseSchedule.from_alphas_cumprod(a.alphas_cumprod)
    assert torch.equal(b.alphas_cumprod, a.alphas_cumprod)
    assert b.num_timesteps == 200
    assert torch.allclose(b.betas.double(), betas, rtol=1e-3, atol=1e-6)
    x, m, z = inputs(800)
    assert torch.equal(R.ddim_step(x, m, 150, 0.5, t_prev=120, schedule=a, noise=z),
                       R.ddim_step(x, m, 150, 0.5, t_prev=120, schedule=b, noise=z))
    with pytest.raises(ValueError, match="t"):  # checked on the fallback path, not in the math
        dk.ops.fallback.ddim_step(x, m, 200, schedule=a)


@pytest.mark.parametrize("builder", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_schedule(builder):
    plain = getattr(dk.NoiseSchedule, builder)(1000)
    zs = getattr(dk.NoiseSchedule, builder)(1000, rescale_zero_terminal_snr=True)
    assert zs.alphas_cumprod[-1].item() == 0.0
    assert zs.has_zero_terminal_snr and not plain.has_zero_terminal_snr
    assert math.isclose(zs.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-6)
    # independent closed form (Lin et al. 2023): shift sqrt(ab) to end at 0, rescale to keep the start
    sab = plain.alphas_cumprod.double().sqrt()
    expected = ((sab - sab[-1]) * sab[0] / (sab[0] - sab[-1])) ** 2
    assert torch.allclose(zs.alphas_cumprod.double(), expected, rtol=1e-4, atol=1e-7)
    assert bool((zs.alphas_cumprod[1:] <= zs.alphas_cumprod[:-1]).all())


def test_zero_terminal_snr_from_alphas_cumprod():
    plain = dk.NoiseSchedule.linear()
    zs = dk.NoiseSchedule.from_alphas_cumprod(plain.alphas_cumprod, rescale_zero_terminal_snr=True)
    assert zs.alphas_cumprod[-1].item() == 0.0
    assert math.isclose(zs.alphas_cumprod[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-6)


@pytest.mark.parametrize("impl", ["fallback", "public"])
def test_zero_terminal_snr_epsilon_raises_v_works(impl):
    ops = dk.ops.fallback if impl == "fallback" else dk
    zs = dk.NoiseSchedule.linear(rescale_zero_terminal_snr=True)
    T = zs.num_timesteps
    x, m, z = inputs(900)
    with pytest.raises(ValueError, match="prediction_type|epsilon"):
        ops.ddim_step(x, m, T - 1, 0.0, t_prev=T - 21, schedule=zs)
    with pytest.raises(ValueError, match="prediction_type|epsilon"):
        ops.ddpm_step(x, m, T - 1, schedule=zs, noise=z)
    with pytest.raises(ValueError, match="prediction_type|epsilon"):  # per-sample t containing T-1
        ops.ddim_step(x, m, torch.tensor([5, T - 1, 7]), 0.0, schedule=zs)
    # epsilon away from the last step is fine
    assert torch.isfinite(ops.ddim_step(x, m, T - 2, 0.0, schedule=zs)).all()
    # v_prediction at the last step: ab = 0 gives x0 = -m, eps = x
    for eta in (0.0, 1.0):
        got = ops.ddim_step(x, m, T - 1, eta, t_prev=T - 21, schedule=zs, prediction_type="v_prediction", noise=z)
        assert torch.isfinite(got).all()
        expected = ddim_closed(x, m, T - 1, T - 21, eta, z, "v_prediction", sched=zs)
        assert max_rel_err(got, expected) <= 1e-9
    got = ops.ddpm_step(x, m, T - 1, schedule=zs, prediction_type="v_prediction", noise=z)
    assert torch.isfinite(got).all()
    assert max_rel_err(got, ddpm_closed(x, m, T - 1, T - 2, z, "v_prediction", sched=zs)) <= 1e-9
