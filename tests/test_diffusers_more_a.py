"""Fused drop-ins of issue 23 (EDM Euler, DDIM inverse, TCD, IPNDM, FlowMatch Heun,
DPM-Solver single-step) against the stock diffusers classes: whole loops with the same
deterministic model, the same seeds, over config grids."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")

from diffkern.integrations import diffusers as DK  # noqa: E402

SHAPE = (3, 4, 7, 5)  # odd sizes


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic nonlinear stand-in for a denoiser: the same function in every
    dtype, depending on the timestep so that a step at the wrong t shows."""
    tt = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
    g = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape).to(x.dtype)
    return 0.6 * torch.tanh(x) + 0.3 * g * math.cos(1e-3 * tt + 0.2) + 0.1 * x


def _x0(dtype=torch.float32, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _loop(sched, x, steps=8, step_kw=None, gen_seed=None, set_kw=None, upcast_tables=False):
    sched.set_timesteps(steps, **(set_kw or {}))
    if upcast_tables:
        for k in ("alphas_cumprod", "sigmas", "alphas", "betas", "alpha_t", "sigma_t", "lambda_t"):
            v = getattr(sched, k, None)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(sched, k, v.double())
    g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    kw = dict(step_kw or {})
    if g is not None:
        kw["generator"] = g
    outs = []
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = _model(xin, t)
        out = sched.step(m, t, x, **kw)
        x = out.prev_sample
        outs.append(x)
    return x, outs


def _close(a, b, rel=1e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"max abs err {err:.3g} vs scale {scale:.3g}"


def _pair(stock_cls, fused_cls, cfg):
    return stock_cls(**cfg), fused_cls(**cfg)


# ---- EDM Euler ----------------------------------------------------------------------
EDM_GRID = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(sigma_schedule="exponential", final_sigmas_type="sigma_min"),
    dict(sigma_data=1.0, rho=5.0, sigma_max=14.6),
]


@pytest.mark.parametrize("cfg", EDM_GRID)
@pytest.mark.parametrize("churn", [0.0, 3.0])
def test_edm_euler_loop_matches_stock(cfg, churn):
    s, f = _pair(diffusers.EDMEulerScheduler, DK.FusedEDMEulerScheduler, cfg)
    kw = dict(s_churn=churn, s_tmin=0.05, s_tmax=50.0)
    a, _ = _loop(s, _x0(), 9, kw, gen_seed=5)
    b, _ = _loop(f, _x0(), 9, kw, gen_seed=5)
    _close(b, a)


def test_edm_euler_given_x0_and_per_sample_timesteps():
    s, f = _pair(diffusers.EDMEulerScheduler, DK.FusedEDMEulerScheduler, {})
    s.set_timesteps(6)
    f.set_timesteps(6)
    x = _x0() * 5
    x0 = _x0(seed=3)
    i = 2
    s._step_index = f._step_index = i
    t = s.timesteps[i]
    m = _model(x, t)
    ref = s.step(m, t, x, pred_original_sample=x0, s_churn=2.0, generator=torch.Generator().manual_seed(1))
    out = f.step(m, t, x, pred_original_sample=x0, s_churn=2.0, generator=torch.Generator().manual_seed(1))
    _close(out.prev_sample, ref.prev_sample)
    assert out.pred_original_sample is x0
    # one timestep per sample: each sample as its own stock step
    f2 = DK.FusedEDMEulerScheduler()
    f2.set_timesteps(6)
    idx = [0, 3, 5]
    ts = f2.timesteps[idx]
    x = _x0()[:, :, :6].transpose(2, 3)  # non-contiguous view
    m = _model(x, 0.0)
    out = f2.step(m, ts, x)
    for b, j in enumerate(idx):
        s2 = diffusers.EDMEulerScheduler()
        s2.set_timesteps(6)
        s2._step_index = j
        ref = s2.step(m[b:b + 1], s2.timesteps[j], x[b:b + 1])
        _close(out.prev_sample[b:b + 1], ref.prev_sample)
        _close(out.pred_original_sample[b:b + 1], ref.pred_original_sample)
    assert f2.step_index is None


# ---- DDIM inverse -------------------------------------------------------------------
INV_GRID = [
    dict(),
    dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(prediction_type="sample", set_alpha_to_one=False, beta_schedule="scaled_linear"),
    dict(clip_sample=True, clip_sample_range=1.5, steps_offset=1),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
         beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("cfg", INV_GRID)
def test_ddim_inverse_loop_matches_stock(cfg):
    s, f = _pair(diffusers.DDIMInverseScheduler, DK.FusedDDIMInverseScheduler, cfg)
    a, xs_a = _loop(s, _x0(), 10)
    b, xs_b = _loop(f, _x0(), 10)
    for u, v in zip(xs_b, xs_a, strict=True):
        _close(u, v)


def test_ddim_inverse_int_and_per_sample_timesteps():
    s, f = _pair(diffusers.DDIMInverseScheduler, DK.FusedDDIMInverseScheduler, dict(clip_sample=True))
    s.set_timesteps(10)
    f.set_timesteps(10)
    x = _x0()[..., :4].transpose(-1, -2)  # non-contiguous view
    ts = [0, 300, 900]
    m = _model(x, 0.0)
    out = f.step(m, torch.tensor(ts), x)
    for b, t in enumerate(ts):
        ref = s.step(m[b:b + 1], t, x[b:b + 1])
        one = f.step(m[b:b + 1], t, x[b:b + 1])
        _close(out.prev_sample[b:b + 1], ref.prev_sample)
        _close(out.pred_original_sample[b:b + 1], ref.pred_original_sample)
        _close(one.prev_sample, ref.prev_sample)


# ---- TCD ----------------------------------------------------------------------------
TCD_GRID = [
    dict(),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(prediction_type="sample", set_alpha_to_one=False),
]


@pytest.mark.parametrize("cfg", TCD_GRID)
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_loop_matches_stock(cfg, eta):
    s, f = _pair(diffusers.TCDScheduler, DK.FusedTCDScheduler, cfg)
    a, xs_a = _loop(s, _x0(), 6, dict(eta=eta), gen_seed=7)
    b, xs_b = _loop(f, _x0(), 6, dict(eta=eta), gen_seed=7)
    for u, v in zip(xs_b, xs_a, strict=True):
        _close(u, v)


def test_tcd_per_sample_timesteps(monkeypatch):
    import diffusers.schedulers.scheduling_tcd as T

    f = DK.FusedTCDScheduler()
    f.set_timesteps(5)
    x = _x0()[..., :4].transpose(-1, -2)  # non-contiguous view
    m = _model(x, 0.0)
    z = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).float()
    idx = [4, 0, 2]  # 4 is the last step: no noise there
    out = f.step(m, f.timesteps[idx], x, eta=0.5, variance_noise=z)
    for b, j in enumerate(idx):
        s = diffusers.TCDScheduler()
        s.set_timesteps(5)
        s._step_index = j
        monkeypatch.setattr(T, "randn_tensor", lambda *a, b=b, **k: z[b:b + 1])
        ref = s.step(m[b:b + 1], s.timesteps[j], x[b:b + 1], eta=0.5)
        _close(out.prev_sample[b:b + 1], ref.prev_sample)
        _close(out.pred_noised_sample[b:b + 1], ref.pred_noised_sample)


# ---- IPNDM --------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [3, 10, 25])
def test_ipndm_loop_matches_stock(steps):
    s, f = _pair(diffusers.IPNDMScheduler, DK.FusedIPNDMScheduler, {})
    s.set_timesteps(steps)
    x = xs = _x0()
    f.set_timesteps(steps)
    for t in f.timesteps:
        xs = s.step(_model(xs, t), t, xs).prev_sample
        x = f.step(_model(x, t), t, x).prev_sample
        _close(x, xs)


def test_ipndm_per_sample_timesteps():
    f = DK.FusedIPNDMScheduler()
    f.set_timesteps(7)
    x = _x0()[..., :4].transpose(-1, -2)  # non-contiguous view
    hist = [_x0(seed=k)[..., :4].transpose(-1, -2) for k in (11, 12, 13)]
    idx = [1, 6, 3]
    m = _model(x, 0.0)
    f.ets = list(hist)
    out = f.step(m, f.timesteps[idx], x).prev_sample
    for b, j in enumerate(idx):
        s = diffusers.IPNDMScheduler()
        s.set_timesteps(7)
        s.alphas, s.betas = s.alphas.double(), s.betas.double()
        s._step_index = j
        s.ets = [h[b:b + 1].double() for h in hist]
        ref = s.step(m[b:b + 1].double(), s.timesteps[j], x[b:b + 1].double()).prev_sample
        _close(out[b:b + 1], ref)


# ---- FlowMatch Heun -----------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("churn", [0.0, 4.0])
def test_flow_heun_loop_matches_stock(shift, churn):
    s, f = _pair(diffusers.FlowMatchHeunDiscreteScheduler, DK.FusedFlowMatchHeunDiscreteScheduler, dict(shift=shift))
    kw = dict(s_churn=churn, s_tmin=0.2, s_tmax=0.9)
    s.set_timesteps(7)
    f.set_timesteps(7)
    gs, gf = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xs = xf = _x0()
    for ts, tf in zip(s.timesteps, f.timesteps, strict=True):
        xs = s.step(_model(xs, ts), ts, xs, generator=gs, **kw).prev_sample
        xf = f.step(_model(xf, tf), tf, xf, generator=gf, **kw).prev_sample
        _close(xf, xs)
    assert torch.equal(gs.get_state(), gf.get_state())  # the same draws


def test_flow_heun_per_sample_timesteps():
    f = DK.FusedFlowMatchHeunDiscreteScheduler(shift=2.0)
    f.set_timesteps(5)
    x = _x0()[..., :4].transpose(-1, -2)  # non-contiguous view
    first = [0, 4, 6]  # positions of first stages (even: each timestep but the first comes twice)
    m1 = _model(x, 0.0)
    p1 = f.step(m1, f.timesteps[first], x).prev_sample
    m2 = _model(p1, 1.0)
    p2 = f.step(m2, f.timesteps[[j + 1 for j in first]], p1).prev_sample
    for b, j in enumerate(first):
        s = diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0)
        s.set_timesteps(5)
        s._step_index = j
        r1 = s.step(m1[b:b + 1], s.timesteps[j], x[b:b + 1]).prev_sample
        r2 = s.step(m2[b:b + 1], s.timesteps[j + 1], r1).prev_sample
        _close(p1[b:b + 1], r1)
        _close(p2[b:b + 1], r2)


# ---- DPM-Solver single-step ---------------------------------------------------------
def _single_grid():
    out = []
    for order in (1, 2, 3):
        for algo in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
            for stype in ("midpoint", "heun"):
                cfg = dict(solver_order=order, algorithm_type=algo, solver_type=stype)
                if algo == "dpmsolver":
                    cfg["final_sigmas_type"] = "sigma_min"
                out.append(cfg)
    out += [
        dict(solver_order=3, prediction_type="v_prediction", use_karras_sigmas=True, lower_order_final=False,
             final_sigmas_type="sigma_min"),
        dict(solver_order=2, prediction_type="sample", thresholding=True, sample_max_value=1.2),
        dict(solver_order=3, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        dict(solver_order=2, variance_type="learned_range", use_exponential_sigmas=True),
    ]
    return out


@pytest.mark.parametrize("cfg", _single_grid(), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [6, 7])
def test_dpm_single_loop_matches_stock(cfg, steps):
    """Stock with its sigmas upcast to float64 after set_timesteps (the samples stay
    float32, so the noise draws are the same): its float32 log / exp coefficients round
    more than 1e-5 at small sigmas."""
    s, f = _pair(diffusers.DPMSolverSinglestepScheduler, DK.FusedDPMSolverSinglestepScheduler, cfg)
    s.set_timesteps(steps)
    f.set_timesteps(steps)
    s.sigmas = s.sigmas.double()
    gs, gf = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    learned = cfg.get("variance_type") is not None
    xs = xf = _x0()[:, :3] if learned else _x0()  # learned variance: 3 channels, 6 in the model output
    for ts, tf in zip(s.timesteps, f.timesteps, strict=True):
        ms, mf = _model(xs, ts), _model(xf, tf)
        if learned:
            ms, mf = torch.cat([ms, -ms], 1), torch.cat([mf, -mf], 1)
        xs = s.step(ms, ts, xs, generator=gs).prev_sample
        xf = f.step(mf, tf, xf, generator=gf).prev_sample
        _close(xf, xs)


# ---- every class: no host reads per step ---------------------------------------------
class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


SYNC_CASES = [
    ("FusedEDMEulerScheduler", {}, dict(s_churn=2.0)),
    ("FusedDDIMInverseScheduler", dict(clip_sample=True), {}),
    ("FusedTCDScheduler", {}, dict(eta=0.3)),
    ("FusedIPNDMScheduler", {}, {}),
    ("FusedFlowMatchHeunDiscreteScheduler", {}, dict(s_churn=2.0, s_tmin=0.1, s_tmax=0.9)),
    ("FusedDPMSolverSinglestepScheduler", dict(solver_order=3, algorithm_type="sde-dpmsolver++"), {}),
]


@pytest.mark.parametrize("name,cfg,kw", SYNC_CASES, ids=[c[0] for c in SYNC_CASES])
def test_no_host_sync_per_step(name, cfg, kw):
    """After set_timesteps, a whole loop (timesteps from ``scheduler.timesteps``, CPU
    tensors: the same code path as device-resident ones), then a (B,) step, read no
    tensor on the host."""
    sched = getattr(DK, name)(**cfg)
    sched.set_timesteps(7)
    x = _x0()
    g = torch.Generator().manual_seed(0)
    if "generator" in inspect.signature(sched.step).parameters:
        kw = dict(kw, generator=g)
    with _CountSyncs() as c:
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(torch.tanh(xin), t, x, **kw).prev_sample
        tb = sched.timesteps[[0, 1, 2]]
        kb = {k: v for k, v in kw.items() if k != "s_churn"}  # churn needs a scalar timestep
        x = sched.step(torch.tanh(x), tb, x, **kb).prev_sample
    assert c.n == 0
    assert torch.isfinite(x).all()
    with _CountSyncs() as c:  # the counter counts
        torch.tensor(1.0).item()
    assert c.n == 1


@pytest.mark.parametrize("name", [c[0] for c in SYNC_CASES])
def test_saved_config_names_the_stock_class(name, tmp_path):
    cls = getattr(DK, name)
    cls().save_config(tmp_path)
    stock = cls._dk_stock
    assert stock.__name__ in (tmp_path / "scheduler_config.json").read_text()
    assert type(stock.from_pretrained(tmp_path)) is stock


NOISY_CASES = [
    ("FusedEDMEulerScheduler", {}, dict(s_churn=2.0)),
    ("FusedTCDScheduler", {}, dict(eta=0.3)),
    ("FusedFlowMatchHeunDiscreteScheduler", {}, dict(s_churn=2.0, s_tmin=0.1, s_tmax=0.9)),
    ("FusedDPMSolverSinglestepScheduler", dict(solver_order=2, algorithm_type="sde-dpmsolver++"), {}),
]


@pytest.mark.parametrize("name,cfg,kw", NOISY_CASES, ids=[c[0] for c in NOISY_CASES])
def test_kernel_noise_mode_draws_from_the_generator(name, cfg, kw):
    """dk_noise="kernel": the step's noise comes from the generator (a seed changes the
    result, the same seed repeats it)."""
    def run(seed):
        sched = getattr(DK, name)(dk_noise="kernel", **cfg)
        return _loop(sched, _x0(), 5, kw, gen_seed=seed)[0]

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_single_per_sample_timesteps(algo, monkeypatch):
    """Each sample at its own position (orders 1, 2, 3, 2): the result, the group's start
    sample and the history entry equal stock's step for that sample alone."""
    cfg = dict(solver_order=3, algorithm_type=algo, solver_type="heun", prediction_type="v_prediction")
    f = DK.FusedDPMSolverSinglestepScheduler(**cfg)
    f.set_timesteps(6)  # orders [1, 2, 3, 1, 2, 1]
    idx = [0, 1, 2, 4]
    x = torch.cat([_x0(seed=1), _x0(seed=2)[:1]])[..., :4].transpose(-1, -2)  # 4 samples, non-contiguous
    hist = [torch.cat([_x0(seed=k), _x0(seed=k + 9)[:1]])[..., :4].transpose(-1, -2) for k in (3, 4, 5)]
    xs = torch.cat([_x0(seed=6), _x0(seed=7)[:1]])[..., :4].transpose(-1, -2)
    z = torch.cat([_x0(seed=8), _x0(seed=9)[:1]])[..., :4].transpose(-1, -2)
    m = _model(x, 0.0)
    f.model_outputs, f.sample = list(hist), xs
    noise = dict(variance_noise=z) if algo.startswith("sde") else {}
    prev = f.step(m, f.timesteps[idx], x, **noise).prev_sample
    import diffusers.schedulers.scheduling_dpmsolver_singlestep as S
    for b, j in enumerate(idx):
        s = diffusers.DPMSolverSinglestepScheduler(**cfg)
        s.set_timesteps(6)
        s.sigmas = s.sigmas.double()
        s.model_outputs, s.sample, s._step_index = [h[b:b + 1] for h in hist], xs[b:b + 1], j
        monkeypatch.setattr(S, "randn_tensor", lambda *a, b=b, **k: z[b:b + 1])
        ref = s.step(m[b:b + 1], s.timesteps[j], x[b:b + 1]).prev_sample
        _close(prev[b:b + 1], ref)
        _close(f.sample[b:b + 1], s.sample)
        _close(f.model_outputs[-1][b:b + 1], s.model_outputs[-1])
