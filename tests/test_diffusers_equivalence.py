"""diffkern (reference and native) against the diffusers schedulers (DDIMScheduler.step,
DDPMScheduler.step, add_noise), float32 inputs, the same noise tensor:
max|a - b| / max|b| <= 1e-5 (see the note above ``diffusers_f64`` for near-zero t)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import NATIVE, PREDICTION_TYPES, gen, max_rel_err, randn

import diffkern as dk

diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the equivalence tests")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

TOL = 1e-5
SHAPE = (2, 3, 16, 16)
IMPLS = [
    pytest.param("reference", id="reference"),
    pytest.param("native", id="native",
                 marks=pytest.mark.skipif(not NATIVE, reason=f"native ops not built: {dk.native_error()}")),
]


def _ops(impl):
    return dk.reference if impl == "reference" else dk


def _sample_and_output(seed, prediction_type):
    x = randn(*SHAPE, seed=seed)
    m = randn(*SHAPE, seed=seed + 1)
    if prediction_type == "sample":
        m = 1.5 * m  # some predictions outside the clip range
    return x, m


SCHEDULE_CONFIGS = {
    "linear": (dict(beta_schedule="linear"), lambda **kw: dk.NoiseSchedule.linear(**kw)),
    "scaled_linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      lambda **kw: dk.NoiseSchedule.scaled_linear(1000, 0.00085, 0.012, **kw)),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), lambda **kw: dk.NoiseSchedule.cosine(**kw)),
}


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_schedules_bitwise_equal_to_diffusers(name, rescale):
    cfg, build = SCHEDULE_CONFIGS[name]
    ref = DDIMScheduler(**cfg, rescale_betas_zero_snr=rescale)
    ours = build(rescale_zero_terminal_snr=rescale)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.to(torch.float32))
    assert torch.equal(ours.betas, ref.betas.to(torch.float32))


# diffusers evaluates its coefficients in float32 0-d tensors, with the textbook
# cancellations (``1 - ab/ab'``, ``1 - ab' - std^2``): near t = 0 its own float32 error
# reaches 1e-5..1e-4 of the output (measured: DDPM t=1 ~5e-5, DDIM 20 -> 0 eta=1 ~1e-5),
# while diffkern is within ~1e-7 of float64 there. So every case is checked against
# diffusers' own formulas evaluated in float64 (the same float32 table, upcast) at 1e-5,
# and against stock float32 diffusers at 1e-5 where that is itself accurate (t >= 100).
STOCK_T_MIN = 100


def diffusers_f64(sched):
    """The same diffusers scheduler computing in float64 (its float32 table upcast exactly)."""
    s = copy.deepcopy(sched)
    s.alphas_cumprod = s.alphas_cumprod.to(torch.float64)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod, dtype=torch.float64)
    return s


@pytest.fixture
def ddpm_noise(monkeypatch):
    """Make DDPMScheduler.step use a given noise tensor (cast to the sample dtype)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    box = {}

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        assert tuple(shape) == tuple(box["z"].shape)
        return box["z"].to(dtype=dtype)

    monkeypatch.setattr(ddpm_mod, "randn_tensor", fake_randn)
    return box


# ---- DDIM ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear"])
def test_ddim_step_matches_diffusers(impl, clip, prediction_type, eta, schedule_name):
    cfg, _ = SCHEDULE_CONFIGS[schedule_name]
    sched = DDIMScheduler(**cfg, clip_sample=clip, set_alpha_to_one=True, prediction_type=prediction_type)
    n_inf = 50
    sched.set_timesteps(n_inf)
    s64 = diffusers_f64(sched)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    ops = _ops(impl)
    jump = sched.config.num_train_timesteps // n_inf
    timesteps = [int(t) for t in sched.timesteps]
    for i, t in enumerate([timesteps[0], timesteps[10], timesteps[25], timesteps[-2], timesteps[-1]]):
        x, m = _sample_and_output(10 * i + int(clip), prediction_type)
        z = randn(*SHAPE, seed=1000 + i)
        kw = dict(t_prev=t - jump, schedule=ours, prediction_type=prediction_type,
                  clip_sample=1.0 if clip else None)
        got = ops.ddim_step(x, m, t, eta, noise=z, **kw)
        assert got.dtype == torch.float32 and got.shape == x.shape
        exp64 = s64.step(m.double(), t, x.double(), eta=eta, variance_noise=z.double()).prev_sample
        assert exp64.dtype == torch.float64
        err = max_rel_err(got, exp64)
        assert err <= TOL, f"vs diffusers-f64, t={t} t_prev={t - jump}: rel err {err:.3g}"
        if t >= STOCK_T_MIN:
            expected = sched.step(m, t, x, eta=eta, variance_noise=z).prev_sample
            assert expected.dtype == torch.float32
            err = max_rel_err(got, expected)
            assert err <= TOL, f"vs diffusers-f32, t={t} t_prev={t - jump}: rel err {err:.3g}"
        # float64 inputs: diffkern computes in float64 and agrees with diffusers-f64 to rounding
        got64 = ops.ddim_step(x.double(), m.double(), t, eta, noise=z.double(), **kw)
        assert max_rel_err(got64, exp64) <= 1e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_zero_terminal_snr_trailing_matches_diffusers(impl, prediction_type):
    """Zero-terminal-SNR schedule, trailing spacing: t = 999 (ab = 0) is a valid first step.
    (Stock float32 diffusers returns NaN there for eta = 1: sqrt of a rounded-negative
    ``1 - ab' - std^2``; its float64 evaluation and diffkern do not.)"""
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=True, prediction_type=prediction_type, rescale_betas_zero_snr=True,
                          timestep_spacing="trailing")
    sched.set_timesteps(25)
    s64 = diffusers_f64(sched)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    assert ours.has_zero_terminal_snr
    ops = _ops(impl)
    jump = 1000 // 25
    for i, t in enumerate([int(sched.timesteps[0]), int(sched.timesteps[12])]):
        x, m = _sample_and_output(50 + i, prediction_type)
        z = randn(*SHAPE, seed=60 + i)
        for eta in (0.0, 0.5, 1.0):
            got = ops.ddim_step(x, m, t, eta, t_prev=t - jump, schedule=ours, prediction_type=prediction_type,
                                noise=z)
            assert torch.isfinite(got).all()
            exp64 = s64.step(m.double(), t, x.double(), eta=eta, variance_noise=z.double()).prev_sample
            assert max_rel_err(got, exp64) <= TOL, (t, eta)
            if eta < 1:
                expected = sched.step(m, t, x, eta=eta, variance_noise=z).prev_sample
                assert max_rel_err(got, expected) <= TOL, (t, eta)


# ---- DDPM ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(impl, clip, prediction_type, variance, ddpm_noise):
    sched = DDPMScheduler(beta_schedule="linear", clip_sample=clip, variance_type=variance,
                          prediction_type=prediction_type)
    s64 = diffusers_f64(sched)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    ops = _ops(impl)
    for i, t in enumerate([999, 600, 100, 37, 1, 0]):
        x, m = _sample_and_output(100 + 7 * i, prediction_type)
        z = randn(*SHAPE, seed=4242 + i)
        ddpm_noise["z"] = z
        kw = dict(schedule=ours, variance=variance, prediction_type=prediction_type,
                  clip_sample=1.0 if clip else None)
        got = ops.ddpm_step(x, m, t, noise=z, **kw)
        exp64 = s64.step(m.double(), t, x.double()).prev_sample
        assert exp64.dtype == torch.float64
        err = max_rel_err(got, exp64)
        assert err <= TOL, f"vs diffusers-f64, t={t}: rel err {err:.3g}"
        if t >= STOCK_T_MIN:
            expected = sched.step(m, t, x).prev_sample
            err = max_rel_err(got, expected)
            assert err <= TOL, f"vs diffusers-f32, t={t}: rel err {err:.3g}"
        got64 = ops.ddpm_step(x.double(), m.double(), t, noise=z.double(), **kw)
        assert max_rel_err(got64, exp64) <= 1e-10


@pytest.mark.parametrize("impl", IMPLS)
def test_ddpm_step_matches_diffusers_own_randn(impl):
    """Unpatched diffusers: its randn_tensor on a CPU generator is torch.randn, so the same
    seed gives diffkern the same noise tensor."""
    sched = DDPMScheduler(beta_schedule="linear", clip_sample=False)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    x, m = _sample_and_output(9, "epsilon")
    for t in (800, 150):
        z = torch.randn(SHAPE, generator=gen(t), dtype=torch.float32)
        expected = sched.step(m, t, x, generator=gen(t)).prev_sample
        got = _ops(impl).ddpm_step(x, m, t, schedule=ours, noise=z)
        assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_step_with_inference_jumps_matches_diffusers(impl, prediction_type, ddpm_noise):
    """After set_timesteps(50) diffusers steps t -> the next timestep (a jump of 20)."""
    sched = DDPMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(50)
    s64 = diffusers_f64(sched)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    ops = _ops(impl)
    ts = [int(t) for t in sched.timesteps]
    for i in (0, 20, len(ts) - 2, len(ts) - 1):
        t = ts[i]
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, m = _sample_and_output(300 + i, prediction_type)
        z = randn(*SHAPE, seed=77 + i)
        ddpm_noise["z"] = z
        got = ops.ddpm_step(x, m, t, t_prev=t_prev, schedule=ours, prediction_type=prediction_type, noise=z)
        exp64 = s64.step(m.double(), t, x.double()).prev_sample
        assert max_rel_err(got, exp64) <= TOL, (t, t_prev)
        if t >= STOCK_T_MIN:
            assert max_rel_err(got, sched.step(m, t, x).prev_sample) <= TOL, (t, t_prev)


# ---- add_noise ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("schedule_name", list(SCHEDULE_CONFIGS))
def test_q_sample_matches_add_noise(impl, schedule_name):
    cfg, _ = SCHEDULE_CONFIGS[schedule_name]
    sched = DDPMScheduler(**cfg)
    ours = dk.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod)
    ops = _ops(impl)
    B = 6
    x0 = randn(B, 3, 8, 8, seed=1)
    z = randn(B, 3, 8, 8, seed=2)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    expected = sched.add_noise(x0, z, t)
    got, n = ops.q_sample(x0, t, z, schedule=ours)
    assert max_rel_err(got, expected) <= TOL
    assert torch.equal(n, z)
    # a single timestep for the whole batch
    expected1 = sched.add_noise(x0, z, torch.tensor([321] * B))
    got1, _ = ops.q_sample(x0, 321, z, schedule=ours)
    assert max_rel_err(got1, expected1) <= TOL
