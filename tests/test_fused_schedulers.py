"""diffkern.integrations.diffusers: each Fused* scheduler against its stock diffusers class.

Loops of 20 steps on random model outputs with the same noise (the fused step gets
``variance_noise=``, stock's ``randn_tensor`` is made to return the same tensor). Per step,
``prev_sample`` and ``pred_original_sample`` must be within 1e-5 relative (max|a-b|/max|b|)
of stock float32, or -- where stock's own float32 rounding is larger (small t) -- within
1e-5 of a float64 run of stock (its tables upcast): see ``check_close``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import sys

import pytest
import torch
from conftest import PREDICTION_TYPES, gen, max_rel_err
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
    FusedFlowMatchEulerDiscreteScheduler,
    FusedHeunDiscreteScheduler,
    FusedLCMScheduler,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on stock's np.array(tensor)

TOL = 1e-5
SHAPE = (2, 3, 8, 8)
SPACINGS = ("leading", "linspace", "trailing")


# ---- harness ----------------------------------------------------------------------------
def upcast(sched):
    """The same scheduler computing in float64: every float32 tensor it holds, upcast."""
    s = copy.deepcopy(sched)
    for k, v in list(vars(s).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(s, k, v.double())
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod, dtype=torch.float64)
    return s


class _Torch64:
    """``torch`` with ``float32`` meaning float64: stock Euler / DPM / flow steps upcast
    with ``sample.to(torch.float32)``; their float64 oracle runs with this in their module."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def in_float64(stock_cls):
    mod = sys.modules[stock_cls.__module__]
    real = mod.torch
    mod.torch = _Torch64()
    try:
        yield
    finally:
        mod.torch = real


class NoiseBox:
    """Stock's randn_tensor replaced by "the tensor the test drew", cast as stock asks."""

    def __init__(self, monkeypatch, stock_cls):
        self.z = None
        self.calls = 0
        monkeypatch.setattr(sys.modules[stock_cls.__module__], "randn_tensor", self._randn, raising=False)

    def _randn(self, shape, generator=None, device=None, dtype=None, **kw):
        assert tuple(shape) == tuple(self.z.shape)
        self.calls += 1
        return self.z.to(dtype=dtype)


def rand(g, shape=SHAPE, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def check_close(got, stock32, stock64, what):
    """Within TOL of stock float32, or else within TOL of stock's float64 run.

    The second clause is for where stock's own float32 arithmetic is the larger error
    (its tables are float32, so e.g. ``1 - alphas_cumprod`` at small t keeps ~3 digits).
    It bounds the fused result against the oracle alone, never against stock's float32
    error: the fused step forms its coefficients in float64 and evaluates in float32, so
    on the same inputs it is a few ulp (u = 6e-8) times the formula's condition from the
    float64 result, and a 20-step chain adds those up, ~1e-6 at most: TOL = 1e-5 is an
    order of magnitude above that and below any real difference of formula (>= 1e-3).
    (Comparing "fused no further from float64 than stock float32" would compare two
    rounding errors of the same size: a coin flip across machines.)"""
    e32 = max_rel_err(got, stock32)
    if e32 <= TOL:
        return e32
    e64 = max_rel_err(got, stock64)
    assert e64 <= TOL, f"{what}: {e32:.3g} from stock f32, {e64:.3g} from stock f64 " \
                       f"(stock f32 is {max_rel_err(stock32, stock64):.3g} from f64)"
    return e32


def run_loops(monkeypatch, stock_cls, fused_cls, config, n_steps=20, *, set_kw=None, step_kw=None,
              seed=0, m_scale=1.0, shape=SHAPE, check_x0=True, x0_bound=None):
    """Stock and fused loops side by side on the same model outputs and noise.

    Two fused schedulers run: one on its own chain (whose ``prev_sample`` is compared with
    stock's chain), one fed stock's chain (every output compared with stock's step from
    the same input: a predicted x0 at large t amplifies the chains' rounding
    differences by 1/sqrt(alphas_cumprod), which says nothing about the step). The float64
    oracle runs both ways too. Returns the number of noise draws stock made."""
    set_kw, step_kw = set_kw or {}, step_kw or {}
    stock = stock_cls(**config)
    args = () if n_steps is None else (n_steps,)
    stock.set_timesteps(*args, **set_kw)
    s64, s64_tf = upcast(stock), upcast(stock)
    fused, fused_tf = fused_cls.from_config(stock.config), fused_cls.from_config(stock.config)
    for f in (fused, fused_tf):
        f.set_timesteps(*args, **set_kw)
        assert torch.equal(stock.timesteps, f.timesteps)
    box = NoiseBox(monkeypatch, stock_cls)
    g = gen(seed)
    x64 = rand(g, shape) * float(getattr(stock, "init_noise_sigma", 1.0))
    xs, xf = x64.float(), x64.float()
    takes_noise = "variance_noise" in inspect.signature(stock_cls.step).parameters
    fused_takes_noise = "variance_noise" in inspect.signature(fused_cls.step).parameters

    def kw_for(z):
        return dict(step_kw, variance_noise=z) if takes_noise else step_kw

    for i, (t, tf, tf2) in enumerate(zip(stock.timesteps, fused.timesteps, fused_tf.timesteps, strict=True)):
        m64, z64 = rand(g, shape, m_scale), rand(g, shape)
        m, z = m64.float(), z64.float()
        box.z = z64
        if hasattr(stock, "scale_model_input"):
            ms = stock.scale_model_input(xs, t)
            with in_float64(stock_cls):
                m64_tf = s64_tf.scale_model_input(xs.double(), t)
                s64.scale_model_input(x64, t)
            check_close(fused_tf.scale_model_input(xs, tf2), ms, m64_tf, f"scale {i}")
            fused.scale_model_input(xf, tf)
        out_s = stock.step(m, t, xs, **kw_for(z))
        with in_float64(stock_cls):
            out_64 = s64.step(m64, t, x64, **kw_for(z64))
            out_64tf = s64_tf.step(m.double(), t, xs.double(), **kw_for(z.double()))
        kw_f = dict(step_kw, variance_noise=z) if fused_takes_noise else step_kw
        out_tf = fused_tf.step(m, tf2, xs, **kw_f)
        out_f = fused.step(m, tf, xf, **kw_f)
        assert type(out_f) is type(out_s)
        assert out_64.prev_sample.dtype == torch.float64
        for name in ("prev_sample", "pred_original_sample", "denoised"):
            a = getattr(out_s, name, None)
            if a is None or (name == "pred_original_sample" and not check_x0):
                continue
            b = getattr(out_tf, name)
            assert b.dtype == a.dtype and b.shape == a.shape, name
            if name == "pred_original_sample" and x0_bound is not None:
                # elementwise, against float64 on the same float32 inputs
                err = (b.double() - out_64tf.pred_original_sample).abs()
                bound = x0_bound(stock, int(t), xs.double(), m.double(), out_64tf.pred_original_sample)
                assert bool((err <= bound).all()), f"{name} step {i} (t={t}): {(err / bound).max():.3g} x the bound"
                continue
            check_close(b, a, getattr(out_64tf, name), f"{name} step {i} (t={t})")
        check_close(out_f.prev_sample, out_s.prev_sample, out_64.prev_sample, f"chain after step {i} (t={t})")
        xs, xf, x64 = out_s.prev_sample, out_f.prev_sample, out_64.prev_sample
    return box.calls // 3


def opt_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


# ---- DDIM -----------------------------------------------------------------------------
DDIM_OPTIONS = [
    dict(clip_sample=False),
    dict(set_alpha_to_one=False),
    dict(steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample_range=1.5),
]


@pytest.mark.parametrize("spacing,eta", [("leading", 0.0), ("leading", 1.0), ("linspace", 1.0), ("trailing", 0.5)])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_matches_stock(monkeypatch, prediction_type, spacing, eta):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing)
    m_scale = 1.5 if prediction_type == "sample" else 1.0
    draws = run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=eta), m_scale=m_scale)
    assert draws == 0  # stock DDIM took the variance_noise given


@pytest.mark.parametrize("options", DDIM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_options_match_stock(monkeypatch, prediction_type, options):
    cfg = dict(options, prediction_type=prediction_type, timestep_spacing="linspace")
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=0.7),
              m_scale=1.5 if prediction_type == "sample" else 1.0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_zero_terminal_snr_trailing(monkeypatch, prediction_type):
    cfg = dict(prediction_type=prediction_type, timestep_spacing="trailing", rescale_betas_zero_snr=True,
               beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, n_steps=25, step_kw=dict(eta=0.0))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_use_clipped_model_output(monkeypatch, prediction_type):
    cfg = dict(prediction_type=prediction_type, clip_sample=True, clip_sample_range=0.8)
    run_loops(monkeypatch, DDIMScheduler, FusedDDIMScheduler, cfg, step_kw=dict(eta=0.5, use_clipped_model_output=True),
              m_scale=2.0, check_x0=prediction_type != "epsilon")  # see test_clipped_x0_at_large_t


# ---- DDPM -----------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,variance_type", [("leading", "fixed_small"), ("linspace", "fixed_small_log"),
                                                   ("trailing", "fixed_large")])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_loop_matches_stock(monkeypatch, prediction_type, spacing, variance_type):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, variance_type=variance_type)
    draws = run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, cfg,
                      m_scale=1.5 if prediction_type == "sample" else 1.0)
    assert draws == 20 - (spacing != "trailing")  # no draw at t = 0 (trailing never reaches it)


@pytest.mark.parametrize("options", [dict(clip_sample=False), dict(steps_offset=1), dict(clip_sample_range=0.7),
                                     dict(beta_schedule="sigmoid"), dict(thresholding=True, sample_max_value=1.5),
                                     dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ddpm_options_match_stock(monkeypatch, options):
    clipped_small = options.get("clip_sample_range", 1) < 1 or options.get("thresholding")
    run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, options, m_scale=2.0,
              check_x0=not clipped_small)  # see test_clipped_x0_at_large_t


def _eps_x0_bound(stock, t, x, m, x0_64):
    """What float32 evaluation of ``x0 = a0 x + b0 m`` may be off by, elementwise.

    a0 = 1/sqrt(ab) and b0 = -sqrt(1-ab)/sqrt(ab) are formed in float64 and rounded (u
    each, u = 2^-24); the two products and the sum round once each. So the error is at
    most 2u (|a0 x| + |b0 m|) + u |x0| to first order: 4u and 2u leave room for the
    second-order terms. A wrong formula is off by far more (>= 1e-3 of |x0|)."""
    u = 2.0 ** -24
    ab = float(stock.alphas_cumprod[t])
    a0, b0 = 1 / ab ** 0.5, (1 - ab) ** 0.5 / ab ** 0.5
    return 4 * u * (a0 * x.abs() + b0 * m.abs()) + 2 * u * x0_64.abs()


def test_clipped_x0_at_large_t(monkeypatch):
    """The kernels form an epsilon-prediction x0 as ``a0 x + b0 m`` (one linear form for every
    prediction type), rounding at the size of x/sqrt(ab) (~30x |x| at t=850); stock
    subtracts first. Where most of x0 is clipped to a small range, max|x0| is small, so a
    tolerance relative to max|x0| measures the inputs, not the step: it read 7.7e-6 on one
    machine and 1.4e-5 on another (the chain fed to the step is stock's float32 one, which
    differs between CPUs). The x0 is held instead to the rounding bound of its own formula,
    elementwise (``_eps_x0_bound``); prev_sample keeps the usual check."""
    run_loops(monkeypatch, DDPMScheduler, FusedDDPMScheduler, dict(clip_sample_range=0.7), m_scale=2.0,
              x0_bound=_eps_x0_bound)


def test_ddpm_custom_timesteps_and_full_chain(monkeypatch):
    cfg = dict(num_train_timesteps=50)
    stock = DDPMScheduler(**cfg)
    fused = FusedDDPMScheduler(**cfg)
    custom = [45, 30, 29, 12, 3, 0]
    stock.set_timesteps(timesteps=custom)
    fused.set_timesteps(timesteps=custom)
    box = NoiseBox(monkeypatch, DDPMScheduler)
    g = gen(3)
    x = rand(g).float()
    xs, xf = x, x.clone()
    for t in custom:  # Python ints
        m, z = rand(g).float(), rand(g).float()
        box.z = z
        xs = stock.step(m, t, xs).prev_sample
        xf = fused.step(m, t, xf, variance_noise=z).prev_sample
        assert max_rel_err(xf, xs) <= TOL
    # before set_timesteps: t -> t - 1
    stock, fused = DDPMScheduler(**cfg), FusedDDPMScheduler(**cfg)
    m, z = rand(g).float(), rand(g).float()
    box.z = z
    assert max_rel_err(fused.step(m, 17, x, variance_noise=z).prev_sample, stock.step(m, 17, x).prev_sample) <= TOL



# ---- Euler ----------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_euler_loop_matches_stock(monkeypatch, prediction_type, spacing):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, beta_schedule="scaled_linear",
               beta_start=0.00085, beta_end=0.012)
    assert run_loops(monkeypatch, EulerDiscreteScheduler, FusedEulerDiscreteScheduler, cfg) == 0


EULER_OPTIONS = [
    (dict(use_karras_sigmas=True), {}, {}),
    (dict(use_exponential_sigmas=True), {}, {}),
    (dict(use_beta_sigmas=True), {}, {}),
    (dict(interpolation_type="log_linear"), {}, {}),
    (dict(final_sigmas_type="sigma_min", use_karras_sigmas=True), {}, {}),
    (dict(timestep_type="continuous", prediction_type="v_prediction"), {}, {}),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), {}, {}),
    (dict(timestep_spacing="leading", steps_offset=1), {}, {}),
    (dict(), {}, dict(s_churn=2.0, s_tmin=0.2, s_tmax=5.0, s_noise=1.003)),
    (dict(prediction_type="v_prediction"), {}, dict(s_churn=1.0)),
]


@pytest.mark.parametrize("cfg,set_kw,step_kw", EULER_OPTIONS, ids=[opt_id({**a, **c}) for a, _, c in EULER_OPTIONS])
def test_euler_options_match_stock(monkeypatch, cfg, set_kw, step_kw):
    run_loops(monkeypatch, EulerDiscreteScheduler, FusedEulerDiscreteScheduler, cfg, set_kw=set_kw, step_kw=step_kw)


def test_euler_custom_sigmas(monkeypatch):
    sigmas = [14.6, 9.0, 5.5, 3.1, 1.7, 0.9, 0.4, 0.1, 0.0]
    run_loops(monkeypatch, EulerDiscreteScheduler, FusedEulerDiscreteScheduler, {}, n_steps=None,
              set_kw=dict(sigmas=sigmas))


@pytest.mark.parametrize("options", [dict(timestep_spacing="linspace"),
                                     dict(timestep_spacing="leading", steps_offset=1),
                                     dict(timestep_spacing="trailing", rescale_betas_zero_snr=True),
                                     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)],
                         ids=opt_id)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_loop_matches_stock(monkeypatch, prediction_type, options):
    if options.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
        pytest.skip("epsilon prediction is undefined at zero terminal SNR")
    cfg = dict(options, prediction_type=prediction_type)
    assert run_loops(monkeypatch, EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler, cfg) == 20


# ---- Heun -----------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_heun_loop_matches_stock(monkeypatch, prediction_type, spacing):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing)
    run_loops(monkeypatch, HeunDiscreteScheduler, FusedHeunDiscreteScheduler, cfg, n_steps=10)


@pytest.mark.parametrize("options", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                     dict(clip_sample=True, clip_sample_range=2.0),
                                     dict(clip_sample=True, prediction_type="sample"),
                                     dict(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")],
                         ids=opt_id)
def test_heun_options_match_stock(monkeypatch, options):
    m_scale = 2.0 if options.get("prediction_type") == "sample" else 1.0
    run_loops(monkeypatch, HeunDiscreteScheduler, FusedHeunDiscreteScheduler, options, n_steps=10, m_scale=m_scale)


# ---- DPM-Solver++ ------------------------------------------------------------------------
@pytest.mark.parametrize("solver_type,solver_order", [("midpoint", 2), ("heun", 2), ("midpoint", 1)])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_dpm_loop_matches_stock(monkeypatch, prediction_type, solver_type, solver_order):
    cfg = dict(prediction_type=prediction_type, solver_type=solver_type, solver_order=solver_order)
    run_loops(monkeypatch, DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, cfg)


DPM_OPTIONS = [
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(use_karras_sigmas=True),
    dict(use_lu_lambdas=True),
    dict(use_exponential_sigmas=True),
    dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False),
    dict(euler_at_final=True, solver_type="heun"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.2),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
]


@pytest.mark.parametrize("options,n_steps", [(o, 10) for o in DPM_OPTIONS] + [(o, 20) for o in DPM_OPTIONS[5:7]],
                         ids=[f"{opt_id(o)}-{n}" for o, n in [(o, 10) for o in DPM_OPTIONS] + [(o, 20) for o in
                                                                                            DPM_OPTIONS[5:7]]])
def test_dpm_options_match_stock(monkeypatch, options, n_steps):
    m_scale = 2.0 if options.get("thresholding") else 1.0
    run_loops(monkeypatch, DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, options, n_steps=n_steps,
              m_scale=m_scale)


def test_dpm_learned_variance_output_is_sliced():
    """variance_type learned: stock keeps model_output[:, :3] (the epsilon half)."""
    cfg = dict(variance_type="learned_range")
    stock, fused = DPMSolverMultistepScheduler(**cfg), FusedDPMSolverMultistepScheduler(**cfg)
    stock.set_timesteps(6)
    fused.set_timesteps(6)
    g = gen(4)
    xs = rand(g).float()
    xf = xs.clone()
    for t, tf in zip(stock.timesteps, fused.timesteps, strict=True):
        m = rand(g, (2, 6, 8, 8)).float()
        xs = stock.step(m, t, xs).prev_sample
        xf = fused.step(m, tf, xf).prev_sample
        assert max_rel_err(xf, xs) <= TOL


# ---- thresholds at their boundary values (n - 1, n, n + 1) ------------------------------
@pytest.mark.parametrize("n_steps", [14, 15, 16])
@pytest.mark.parametrize("options", [dict(final_sigmas_type="sigma_min"),
                                     dict(final_sigmas_type="sigma_min", solver_type="heun")], ids=opt_id)
def test_dpm_lower_order_final_threshold(monkeypatch, options, n_steps):
    """Stock's lower_order_final makes the last step first-order below 15 steps
    (len(timesteps) < 15). At 15 steps `n <= 15` was 3.8e-3 from stock and no test saw
    it (issue 26): 14, 15 and 16 steps."""
    run_loops(monkeypatch, DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, options, n_steps=n_steps)


FEW_STEPS = [
    (DDIMScheduler, FusedDDIMScheduler, {}, dict(eta=1.0)),
    (DDPMScheduler, FusedDDPMScheduler, {}, {}),
    (EulerDiscreteScheduler, FusedEulerDiscreteScheduler, {}, dict(s_churn=1.0)),
    (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler, {}, {}),
    (HeunDiscreteScheduler, FusedHeunDiscreteScheduler, {}, {}),
    (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, {}, {}),
    (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min"), {}),
    (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler, dict(euler_at_final=True), {}),
    (LCMScheduler, FusedLCMScheduler, {}, {}),
    (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True), {}),
]


@pytest.mark.parametrize("n_steps", [1, 2, 3])
@pytest.mark.parametrize("stock_cls,fused_cls,cfg,step_kw", FEW_STEPS,
                         ids=[f"{f.__name__}-{opt_id({**c, **k})}" for _, f, c, k in FEW_STEPS])
def test_fewest_steps_match_stock(monkeypatch, stock_cls, fused_cls, cfg, step_kw, n_steps):
    """The step-index thresholds at their smallest values: one step (the first step is the
    last: t_prev < 0, sigma_next = 0, DPM's warm-up and final order at once, Heun's second
    stage right away), two (DPM's second order starts: lower_order_nums < 1) and three."""
    run_loops(monkeypatch, stock_cls, fused_cls, cfg, n_steps=n_steps, step_kw=step_kw)


def _f32_next(v: float, toward: float) -> float:
    """The float32 neighbour of v (stock compares its float32 sigma with the bound in float32)."""
    return float(torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)))


@pytest.mark.parametrize("edge", ["at-both", "inside-both"])
def test_euler_churn_window_boundaries(monkeypatch, edge):
    """Churn applies where s_tmin <= sigma <= s_tmax, both ends inclusive: with the bounds on
    two sigmas of the schedule ("at-both") those two steps churn, with the bounds one
    float32 step inside ("inside-both") they do not."""
    probe = EulerDiscreteScheduler()
    probe.set_timesteps(12)
    lo, hi = float(probe.sigmas[8]), float(probe.sigmas[3])
    if edge == "inside-both":
        lo, hi = _f32_next(lo, math.inf), _f32_next(hi, 0.0)
    run_loops(monkeypatch, EulerDiscreteScheduler, FusedEulerDiscreteScheduler, {}, n_steps=12,
              step_kw=dict(s_churn=3.0, s_tmin=lo, s_tmax=hi))


# ---- flow matching ----------------------------------------------------------------------
FLOW_OPTIONS = [
    (dict(), {}),
    (dict(shift=3.0), {}),
    (dict(use_dynamic_shifting=True), dict(mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=0.8)),
    (dict(shift=3.0, shift_terminal=0.05), {}),
    (dict(use_karras_sigmas=True), {}),
    (dict(invert_sigmas=True), {}),
    (dict(stochastic_sampling=True, shift=2.0), {}),
]


@pytest.mark.parametrize("cfg,set_kw", FLOW_OPTIONS, ids=[opt_id({**a, **b}) for a, b in FLOW_OPTIONS])
def test_flow_loop_matches_stock(monkeypatch, cfg, set_kw):
    draws = run_loops(monkeypatch, FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, cfg,
                      set_kw=set_kw)
    assert draws == (20 if cfg.get("stochastic_sampling") else 0)


def test_flow_custom_sigmas_and_scale_noise(monkeypatch):
    sig = [1.0, 0.8, 0.55, 0.3, 0.12, 0.05]
    run_loops(monkeypatch, FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, dict(shift=3.0),
              n_steps=None, set_kw=dict(sigmas=sig))
    stock, fused = FlowMatchEulerDiscreteScheduler(shift=3.0), FusedFlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(10)
    fused.set_timesteps(10)
    g = gen(8)
    x0, z = rand(g).float(), rand(g).float()
    t = stock.timesteps[[0, 7]]
    assert max_rel_err(fused.scale_noise(x0, t, z), stock.scale_noise(x0, t, z)) <= TOL
    stock.set_begin_index(3)
    fused.set_begin_index(3)
    assert max_rel_err(fused.scale_noise(x0, t, z), stock.scale_noise(x0, t, z)) <= TOL


# ---- LCM ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(clip_sample=True, clip_sample_range=1.5), dict(timestep_scaling=5.0),
                                     dict(thresholding=True, sample_max_value=1.3), dict(set_alpha_to_one=False),
                                     dict(timestep_spacing="trailing", original_inference_steps=20)],
                         ids=opt_id)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_lcm_loop_matches_stock(monkeypatch, prediction_type, options):
    if options and prediction_type != "epsilon" and "clip_sample" not in options:
        pytest.skip("options are covered with epsilon prediction")
    cfg = dict(options, prediction_type=prediction_type)
    m_scale = 2.0 if (options.get("clip_sample") or options.get("thresholding")) else 1.0
    draws = run_loops(monkeypatch, LCMScheduler, FusedLCMScheduler, cfg, n_steps=8, m_scale=m_scale)
    assert draws == 7  # none on the last step


def test_lcm_custom_timesteps_quirk(monkeypatch):
    """Custom timesteps with strength < 1: stock slices the list but not num_inference_steps,
    so its last step still adds noise (from t to t); the fused step does the same."""
    run_loops(monkeypatch, LCMScheduler, FusedLCMScheduler, {}, n_steps=None,
              set_kw=dict(timesteps=[999, 759, 499, 259], strength=0.6))


# ---- every class: add_noise, per-sample timesteps, dtypes, syncs, configs, compile -------------
ALL = {  # name: (fused class, config, step kwargs, steps, per-sample positions)
    "ddim": (FusedDDIMScheduler, dict(prediction_type="v_prediction"), dict(eta=1.0), 20, (0, 9, 18)),
    "ddpm": (FusedDDPMScheduler, dict(), dict(), 20, (0, 9, 18)),
    "euler": (FusedEulerDiscreteScheduler, dict(use_karras_sigmas=True), dict(), 20, (0, 9, 18)),
    "euler_a": (FusedEulerAncestralDiscreteScheduler, dict(prediction_type="v_prediction"), dict(), 20, (0, 9, 18)),
    "heun": (FusedHeunDiscreteScheduler, dict(), dict(), 10, (0, 4, 14)),
    "dpm": (FusedDPMSolverMultistepScheduler, dict(solver_type="heun"), dict(), 20, (0, 9, 18)),
    "flow": (FusedFlowMatchEulerDiscreteScheduler, dict(shift=3.0, stochastic_sampling=True), dict(), 20, (0, 9, 18)),
    "lcm": (FusedLCMScheduler, dict(), dict(), 8, (0, 3, 6)),
}
NAMES = list(ALL)


def make(name, n=None):
    cls, cfg, kw, steps, pos = ALL[name]
    sched = cls(**cfg)
    sched.set_timesteps(n or steps)
    return sched, kw, pos


def takes_noise(sched):
    return "variance_noise" in inspect.signature(sched.step).parameters


def noise_kw(sched, z):
    return dict(variance_noise=z) if takes_noise(sched) else {}


@pytest.mark.parametrize("cls", [(DDIMScheduler, FusedDDIMScheduler), (DDPMScheduler, FusedDDPMScheduler),
                                 (LCMScheduler, FusedLCMScheduler)], ids=["ddim", "ddpm", "lcm"])
def test_add_noise_matches_stock(cls):
    stock_cls, fused_cls = cls
    stock = stock_cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    fused = fused_cls.from_config(stock.config)
    g = gen(5)
    x0, z = rand(g, (4, 3, 5, 7)).float(), rand(g, (4, 3, 5, 7)).float()
    for t in (torch.tensor([999, 500, 10, 0]), torch.tensor(321), torch.tensor([7])):
        got = fused.add_noise(x0, z, t)
        assert got.dtype == torch.float32
        assert max_rel_err(got, stock.add_noise(x0, z, t)) <= TOL
    # fp16 samples: coefficients in float32, held to stock float32
    t = torch.tensor([999, 500, 10, 0])
    got = fused.add_noise(x0.half(), z.half(), t)
    assert got.dtype == torch.float16
    assert max_rel_err(got, stock.add_noise(x0.half().float(), z.half().float(), t)) <= 1e-3


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpm"])
def test_sigma_add_noise_matches_stock(name):
    fused, _, _ = make(name)
    stock = type(fused)._dk_stock.from_config(fused.config)
    stock.set_timesteps(ALL[name][3])
    g = gen(6)
    x0, z = rand(g, (3, 3, 5, 7)).float(), rand(g, (3, 3, 5, 7)).float()
    t = stock.timesteps[[0, 4, 9]]
    assert max_rel_err(fused.add_noise(x0, z, t), stock.add_noise(x0, z, t)) <= TOL
    fused.set_begin_index(2)
    stock.set_begin_index(2)
    assert max_rel_err(fused.add_noise(x0, z, t), stock.add_noise(x0, z, t)) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_timesteps_equal_separate_calls(name):
    """Two steps with a (B,) timestep (each sample at its own position) equal, per sample,
    two scalar steps of a copy of the scheduler (stock refuses (B,) timesteps)."""
    sched, kw, pos = make(name)
    g = gen(11)
    B = len(pos)
    batch, singles = copy.deepcopy(sched), [copy.deepcopy(sched) for _ in range(B)]
    x = rand(g, (B, 3, 8, 8)).float()
    xs = [x[b:b + 1] for b in range(B)]
    for call in range(2):
        p = [q + call for q in pos]
        t = sched.timesteps[p]
        m, z = rand(g, (B, 3, 8, 8)).float(), rand(g, (B, 3, 8, 8)).float()
        if hasattr(batch, "scale_model_input"):
            scaled = batch.scale_model_input(x, t)
        out = batch.step(m, t, x, **kw, **noise_kw(batch, z))
        for b, one in enumerate(singles):
            tb = t[b:b + 1].reshape(())  # not a view of one.timesteps: found by value, as stock
            if hasattr(one, "scale_model_input"):
                assert max_rel_err(scaled[b:b + 1], one.scale_model_input(xs[b], tb)) <= 1e-6
            o = one.step(m[b:b + 1], tb, xs[b], **kw, **noise_kw(one, z[b:b + 1]))
            for f in ("prev_sample", "pred_original_sample", "denoised"):
                if getattr(o, f, None) is not None:
                    assert max_rel_err(getattr(out, f)[b:b + 1], getattr(o, f)) <= 1e-6, (call, b, f)
            xs[b] = o.prev_sample
        x = out.prev_sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_computed_in_float32(monkeypatch, name, dtype):
    """Half-precision storage is computed in float32: within a rounding of the result of a
    float32 run of stock on the same (rounded) inputs. An fp16 model output with fp32
    latents gives stock's output dtype, within 1e-5 of stock float32."""
    fused, kw, _ = make(name)
    stock_cls = type(fused)._dk_stock
    runs = {}
    for key in ("stock", "half", "mixed"):
        sched = copy.deepcopy(fused) if key != "stock" else stock_cls.from_config(fused.config)
        if key == "stock":
            sched.set_timesteps(ALL[name][3])
        runs[key] = sched
    box = NoiseBox(monkeypatch, stock_cls)
    g = gen(12)
    x, m, z = (rand(g).to(dtype) for _ in range(3))
    box.z = z.float()
    t = fused.timesteps[3]
    for sched in runs.values():
        sched.set_begin_index(3) if hasattr(sched, "set_begin_index") else None
    stock = runs["stock"]
    if hasattr(stock, "scale_model_input"):
        for sched in runs.values():
            sched.scale_model_input(x.float(), t)
    ref = stock.step(m.float(), t, x.float(), **kw, **noise_kw(stock, z.float()))
    out = runs["half"].step(m, t, x, **kw, **noise_kw(runs["half"], z))
    assert out.prev_sample.dtype == dtype
    assert max_rel_err(out.prev_sample, ref.prev_sample) <= 2 * torch.finfo(dtype).eps
    mixed = runs["mixed"].step(m, t, x.float(), **kw, **noise_kw(runs["mixed"], z.float()))
    stock_mixed = copy.deepcopy(fused)  # only for its dtype: the stock dtype rule
    del stock_mixed
    expect = stock_cls.from_config(fused.config)
    expect.set_timesteps(ALL[name][3])
    if hasattr(expect, "set_begin_index"):
        expect.set_begin_index(3)
    if hasattr(expect, "scale_model_input"):
        expect.scale_model_input(x.float(), t)
    dtype_stock = expect.step(m, t, x.float(), **kw, **noise_kw(expect, z.float())).prev_sample.dtype
    assert mixed.prev_sample.dtype == dtype_stock
    tol = TOL if dtype_stock == torch.float32 else 2 * torch.finfo(dtype_stock).eps
    assert max_rel_err(mixed.prev_sample, ref.prev_sample) <= tol


def test_generator_draws_in_kernel():
    """dk_noise="kernel": with a generator the noise is diffkern's (same distribution,
    reproducible by seed)."""
    sched = FusedDDPMScheduler(dk_noise="kernel")
    sched.set_timesteps(10)
    x, m = torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32)
    t = sched.timesteps[2]
    a = sched.step(m, t, x, generator=gen(1)).prev_sample
    b = sched.step(m, t, x, generator=gen(1)).prev_sample
    c = sched.step(m, t, x, generator=gen(2)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    ab, abp = sched.alphas_cumprod[int(t)], sched.alphas_cumprod[int(sched.timesteps[3])]
    std = ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    z = a / std
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="variance_noise"):
        sched.step(m, t, x, generator=gen(1), variance_noise=m)
    # a list of generators: stock's randn_tensor, one generator per sample
    gl = [gen(i) for i in range(4)]
    d = sched.step(m, t, x, generator=gl).prev_sample
    expect = torch.cat([torch.randn((1, 3, 32, 32), generator=gen(i)) for i in range(4)]) * std
    assert max_rel_err(d, expect) <= 1e-6


@pytest.mark.parametrize("name", ["euler_a", "flow", "lcm"])
def test_generator_families(name):
    sched, kw, _ = make(name)
    x = torch.randn(SHAPE)
    outs = []
    for seed in (1, 1, 2):
        s = copy.deepcopy(sched)
        t = s.timesteps[1]
        if hasattr(s, "scale_model_input"):
            s.scale_model_input(x, t)
        outs.append(s.step(torch.randn(SHAPE, generator=gen(9)), t, x, generator=gen(seed), **kw).prev_sample)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_replaced_timesteps_are_followed(name):
    """A pipeline that assigns scheduler.timesteps after set_timesteps (a slice of them):
    positions are those of the new tensor, as stock's lookups by value give."""
    fused, _, _ = make(name)
    stock = type(fused)._dk_stock.from_config(fused.config)
    stock.set_timesteps(ALL[name][3])
    fused.timesteps = fused.timesteps[5:]
    stock.timesteps = stock.timesteps[5:]
    if name == "euler":
        fused.set_begin_index(5)
        stock.set_begin_index(5)
    g = gen(2)
    x = rand(g).float()
    for t, tf in list(zip(stock.timesteps, fused.timesteps, strict=True))[:3]:
        m = rand(g).float()
        if hasattr(stock, "scale_model_input"):
            stock.scale_model_input(x, t)
            fused.scale_model_input(x, tf)
        skw = dict(eta=0.0) if name == "ddim" else {}
        a, b = stock.step(m, t, x, **skw), fused.step(m, tf, x, **skw)
        assert max_rel_err(b.prev_sample, a.prev_sample) <= TOL


# ---- no host syncs ------------------------------------------------------------------
class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_per_step(name):
    """After set_timesteps: no aten._local_scalar_dense in a whole loop (CPU tensors: the
    same code path as device-resident timesteps), nor in a (B,) step or add_noise."""
    sched, kw, _ = make(name)
    stock = type(sched)._dk_stock.from_config(sched.config)
    stock.set_timesteps(ALL[name][3])
    x = torch.randn(SHAPE)
    g = gen(0)
    with CountSyncs() as c:
        for t in sched.timesteps:
            if hasattr(sched, "scale_model_input"):
                sched.scale_model_input(x, t)
            gkw = dict(generator=g) if "generator" in inspect.signature(sched.step).parameters else {}
            x = sched.step(torch.randn(SHAPE), t, x, **gkw, **kw).prev_sample
        tb = sched.timesteps[[1, 2]]
        x = sched.step(torch.randn(SHAPE), tb, x, **kw, **noise_kw(sched, torch.randn(SHAPE))).prev_sample
        add = getattr(sched, "add_noise", None) if name != "flow" else sched.scale_noise
        if add is not None and name != "flow":
            x = add(x, torch.randn(SHAPE), tb)
        elif name == "flow":
            x = add(x, tb, torch.randn(SHAPE))
    assert c.n == 0
    with CountSyncs() as c:  # the counter counts: stock reads its timestep (or sigma) on the host
        t = stock.timesteps[1]
        if hasattr(stock, "scale_model_input"):
            stock.scale_model_input(x, t)
        stock.step(torch.randn(SHAPE), t, x, **kw)
        if name in ("ddim", "ddpm", "lcm"):
            stock.step(torch.randn(SHAPE), stock.timesteps[2], x, **kw)
    assert c.n > 0


# ---- config round trips, errors --------------------------------------------------------
FUSED_CLASSES = [ALL[n][0] for n in NAMES]


@pytest.mark.parametrize("cls", FUSED_CLASSES, ids=lambda c: c.__name__)
def test_config_round_trips(tmp_path, cls):
    stock_cls = cls._dk_stock
    kw = dict(num_train_timesteps=800) if "FlowMatch" in stock_cls.__name__ else dict(
        beta_schedule="scaled_linear", timestep_spacing="trailing")
    stock = stock_cls(**kw)
    fused = cls.from_config(stock.config)
    assert isinstance(fused, stock_cls)
    strip = {"_class_name": None, "_use_default_values": None, "_diffusers_version": None}
    assert dict(fused.config) | strip == dict(stock.config) | strip
    back = stock_cls.from_config(fused.config)
    assert type(back) is stock_cls and dict(back.config) | strip == dict(stock.config) | strip
    assert sorted(c.__name__ for c in fused.compatibles) == sorted(c.__name__ for c in stock.compatibles)
    fused.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == stock_cls.__name__
    loaded = stock_cls.from_pretrained(tmp_path)
    assert type(loaded) is stock_cls and dict(loaded.config) | strip == dict(stock.config) | strip
    again = cls.from_pretrained(tmp_path)
    assert type(again) is cls and dict(again.config) | strip == dict(stock.config) | strip
    # from another scheduler's config, as pipelines swap them
    other = cls.from_config(DDIMScheduler(beta_schedule="scaled_linear").config)
    assert type(other) is cls
    assert inspect.signature(cls.set_timesteps).parameters.keys() == inspect.signature(
        stock_cls.set_timesteps).parameters.keys()


@pytest.mark.parametrize("cls,options", [
    (FusedDDPMScheduler, dict(variance_type="fixed_large_log")),
    (FusedEulerAncestralDiscreteScheduler, dict(prediction_type="sample")),
    (FusedDPMSolverMultistepScheduler, dict(solver_order=3, algorithm_type="sde-dpmsolver",
                                            final_sigmas_type="sigma_min")),
    (FusedDPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", algorithm_type="dpmsolver",
                                            final_sigmas_type="sigma_min")),
], ids=lambda v: v.__name__ if isinstance(v, type) else opt_id(v))
def test_unsupported_options_raise_at_construction(cls, options):
    option = next(iter(options))
    with pytest.raises(NotImplementedError, match=option):
        cls(**options)
    with pytest.raises(NotImplementedError, match=option):
        cls.from_config(cls._dk_stock(**options).config)


def test_unsupported_step_arguments_raise():
    flow, _, _ = make("flow")
    with pytest.raises(NotImplementedError, match="per_token_timesteps"):
        flow.step(torch.randn(SHAPE), flow.timesteps[0], torch.randn(SHAPE), per_token_timesteps=torch.ones(2, 64),
                  variance_noise=torch.randn(SHAPE))
    euler, _, _ = make("euler")
    with pytest.raises(NotImplementedError, match="s_churn"):
        euler.step(torch.randn(SHAPE), euler.timesteps[[0, 1]], torch.randn(SHAPE), s_churn=1.0)


# ---- loops you can compile ---------------------------------------------------------
@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_compiled_loop_body_has_no_graph_breaks(name):
    """torch.compile(fullgraph=True) of model + scale + step: no graph break, the eager
    loop's numbers. (The compiled step finds its sigma from the timestep on the device.)"""
    sched, kw, _ = make(name, n=6)
    kw = dict(kw, eta=0.0) if name == "ddim" else kw
    eager = copy.deepcopy(sched)
    w = torch.randn(3, 3)

    def body(s, x, t):
        xin = s.scale_model_input(x, t)
        m = torch.einsum("bchw,cd->bdhw", xin, w) * 0.1 + t.float() * 1e-3
        return s.step(m, t, x, return_dict=False, **kw)[0]

    compiled = torch.compile(body, fullgraph=True, backend="eager")
    x = torch.randn(SHAPE)
    xe = x.clone()
    for t in sched.timesteps[:3]:
        x = compiled(sched, x, t)
        xe = body(eager, xe, t)
    assert max_rel_err(x, xe) <= 1e-6


# ---- CUDA graphs ------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm"])
def test_whole_loop_in_one_cuda_graph(name):
    """Model + fused steps of a whole loop captured in one CUDA graph: a replay gives the
    eager loop's numbers for a deterministic class, and fresh noise on every replay for a
    stochastic one (the in-kernel draws read the default CUDA generator's Philox state)."""
    dev = torch.device("cuda")
    sched, kw, _ = make(name, n=8)
    sched.set_timesteps(8, device=dev)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).to(dev)
    x_in = torch.randn(SHAPE, device=dev)

    def loop(s, x):
        with torch.no_grad():
            for t in s.timesteps:
                xin = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                x = s.step(0.1 * conv(xin), t, x, **kw).prev_sample
        return x

    def fresh():
        s = copy.deepcopy(sched)
        s.set_timesteps(8, device=dev)
        return s

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(fresh(), x_in)  # warm-up: caches, tables, allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    captured = fresh()
    with torch.cuda.graph(graph):
        out = loop(captured, x_in)
    graph.replay()
    a = out.clone()
    graph.replay()
    b = out.clone()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if name == "dpm":  # deterministic: the replay is the eager loop
        assert max_rel_err(a, loop(fresh(), x_in)) <= 1e-6 and torch.equal(a, b)
    else:
        assert not torch.equal(a, b)


# ---- pipelines ----------------------------------------------------------------------
def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()


U32 = 2.0 ** -24  # float32's unit roundoff


@contextlib.contextmanager
def unet_in_float64(unet):
    """The UNet computing in float64 behind float32 inputs and outputs: pipeline and
    scheduler still see float32 tensors, but the network adds no rounding of its own beyond
    the cast of its output, which is the same for every scheduler."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    unet.double()
    forward = unet.forward
    unet.forward = lambda sample, t, **kw: UNet2DOutput(
        sample=forward(sample.double(), t, **kw).sample.to(sample.dtype))
    try:
        yield unet
    finally:
        del unet.forward
        unet.float()


def pipeline_images(monkeypatch, pipe_cls, unet, scheduler, z0, **kw):
    """The final latent of a 20-step pipeline from the initial noise ``z0`` (its dtype,
    whatever the UNet's): the image before the pipeline's clamp to [0, 1], which leaves most
    pixels of the random UNet's images at 0 or 1, where a difference would not show."""
    monkeypatch.setattr(sys.modules[pipe_cls.__module__], "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None: z0)
    last = []
    step = scheduler.step
    scheduler.step = lambda *a, **k: last.append(step(*a, **k)) or last[-1]
    pipe = pipe_cls(unet=unet, scheduler=scheduler)
    pipe.scheduler = scheduler  # DDIMPipeline's constructor makes its own DDIMScheduler from the config
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=z0.shape[0], num_inference_steps=20, output_type="pt", **kw).images
    latent = last[-1].prev_sample
    assert torch.equal(images, (latent / 2 + 0.5).clamp(0, 1).to(images.dtype))
    return latent


def chain_sensitivity(images_of, z64, ref64):
    """How far the float64 pipeline's images move, relative, per relative unit of a random
    perturbation of its initial noise: the chain's condition, which multiplies any rounding
    a float32 step leaves in the state."""
    dz = z64 * (1 + U32 * torch.randn(z64.shape, generator=gen(99), dtype=torch.float64))
    return max_rel_err(images_of(dz), ref64) / U32


def test_ddim_pipeline_same_images(monkeypatch, one_thread):
    """The fused scheduler in a DDIMPipeline gives the float64 images to float32 accuracy.

    The random UNet's own float32 rounding is kept out (it runs in float64 behind float32
    casts), so the float32 arithmetic left is the scheduler's, and the images are compared
    with an all-float64 run, not with stock's float32 images (two rounding errors of the same
    size: which is the smaller depends on the machine). With ``clip_sample=False`` the chain
    is well conditioned: a relative perturbation of the initial noise moves the final latent
    1-3x as much (measured in float64, seeds 0-5), and the fused latents were <= 6e-7 from
    float64, as were stock's float32 scheduler's: 20 steps of a few ulp each. TOL = 1e-5
    holds with a margin of 15, and a wrong coefficient (>= 1e-3) cannot pass."""
    stock = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    unet = tiny_unet()
    z0 = rand(gen(7), (2, 3, 8, 8)).float()
    with unet_in_float64(unet):
        got = pipeline_images(monkeypatch, diffusers.DDIMPipeline, unet,
                              FusedDDIMScheduler.from_config(stock.config), z0)
        ref = pipeline_images(monkeypatch, diffusers.DDIMPipeline, unet, DDIMScheduler.from_config(stock.config), z0)
    unet.double()
    ref64 = pipeline_images(monkeypatch, diffusers.DDIMPipeline, unet, upcast(stock), z0.double())
    assert max_rel_err(ref, ref64) <= TOL, "premise: stock's float32 scheduler is within TOL of float64 here"
    assert max_rel_err(got, ref64) <= TOL


def test_ddim_pipeline_default_config(monkeypatch, one_thread):
    """Stock's default DDIM config (``clip_sample=True``), where the tiny random UNet's chain
    is ill conditioned: with the clipped x0 of the early steps, the final latent moves
    300-3000x a relative perturbation of the initial noise (measured in float64, seeds 0-5),
    so every float32 scheduler lands ~K u from the float64 latent (K that factor, u
    float32's roundoff). The bound is derived from K, measured here on this input: a
    float32 step leaves a few u of rounding in the state, which the rest of the chain
    amplifies as it amplifies the initial noise. Measured over seeds 0-5, the fused latents
    were <= 1.0 K u from float64 and stock's float32 scheduler's <= 1.1 K u, so 8 K u holds
    with a margin of 7 and is no statement about which float32 run is the closer. The UNet
    runs in float64 as in test_ddim_pipeline_same_images: its own float32 rounding adds
    ~10 K u, a property of the network, not of the scheduler."""
    stock = DDIMScheduler(prediction_type="epsilon")
    assert stock.config.clip_sample
    unet = tiny_unet()
    z0 = rand(gen(7), (2, 3, 8, 8)).float()
    with unet_in_float64(unet):
        got = pipeline_images(monkeypatch, diffusers.DDIMPipeline, unet,
                              FusedDDIMScheduler.from_config(stock.config), z0)
    unet.double()

    def images64(z):
        return pipeline_images(monkeypatch, diffusers.DDIMPipeline, unet, upcast(stock), z)

    ref64 = images64(z0.double())
    k = chain_sensitivity(images64, z0.double(), ref64)
    assert max_rel_err(got, ref64) <= 8 * k * U32, f"chain condition K = {k:.0f}"


def test_ddpm_pipeline_same_images(monkeypatch, one_thread):
    """DDPMPipeline, the same noise for every run (stock's draws and the fused step's
    ``variance_noise`` from one list), UNet in float64 as in test_ddim_pipeline_same_images,
    final latents against an all-float64 run. Unlike DDIM's, this chain is well conditioned
    even with stock's default ``clip_sample=True``: the fresh noise of every step washes out
    earlier differences (the final latent moves 0.2-1.8x a relative perturbation of the
    initial noise, measured in float64, seeds 0-5). There the fused latents were <= 1.1e-6
    from float64 and stock's float32 scheduler's <= 8.6e-7, so TOL = 1e-5 holds with a
    margin of 9."""
    unet = tiny_unet()
    z0 = rand(gen(7), (2, 3, 8, 8)).float()
    noises = [rand(gen(100 + i), (2, 3, 8, 8)).float() for i in range(20)]
    stock = DDPMScheduler(num_train_timesteps=1000)
    assert stock.config.clip_sample
    mod = sys.modules[DDPMScheduler.__module__]

    def images(sched, z, noise_dtype):
        it = iter(noises)
        monkeypatch.setattr(mod, "randn_tensor", lambda shape, generator=None, device=None, dtype=None, **kw:
                            next(it).to(noise_dtype))
        if isinstance(sched, FusedDDPMScheduler):
            step = sched.step
            sched.step = lambda m, t, x, generator=None, **kw: step(m, t, x, variance_noise=next(it), **kw)
        return pipeline_images(monkeypatch, diffusers.DDPMPipeline, unet, sched, z, generator=gen(0))

    with unet_in_float64(unet):
        got = images(FusedDDPMScheduler.from_config(stock.config), z0, torch.float32)
    unet.double()
    ref64 = images(upcast(stock), z0.double(), torch.float64)
    assert max_rel_err(got, ref64) <= TOL


# ---- without diffusers --------------------------------------------------------------
def test_import_without_diffusers(monkeypatch):
    for mod in [m for m in sys.modules if m.startswith("diffkern.integrations.diffusers")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    import diffkern  # noqa: F401
    import diffkern.integrations  # noqa: F401

    with pytest.raises(ImportError, match=r"pip install diffkern\[diffusers\]"):
        import diffkern.integrations.diffusers  # noqa: F401


def test_diffkern_never_imports_diffusers_outside_the_integration():
    """`import diffkern` must not need diffusers: no module outside
    diffkern/integrations/diffusers imports it (a subprocess check would cost seconds)."""
    from pathlib import Path

    import diffkern

    root = Path(diffkern.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "integrations/diffusers" in path.as_posix():
            continue
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if words[:2] in (["import", "diffusers"], ["from", "diffusers"]) or (
                    words[:1] == ["from"] and len(words) > 1 and words[1].startswith("diffusers.")):
                offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert not offenders


def test_scheduler_speed_benchmark_runs(tmp_path, capsys):
    """benchmarks/scheduler_speed.py end to end on a tiny size (in-process: diffusers is
    already imported): a row per class with times, host costs and sync counts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scheduler_speed.py"
    spec = importlib.util.spec_from_file_location("diffkern_scheduler_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.main(["--sizes", "1x4x8x8", "--classes", "DDIM,EulerAncestral,DPMSolverMultistep", "--device", "cpu",
                    "--reps", "1", "--tag", "test", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "test" / "scheduler_speed.json").read_text())
    assert saved["schema"] == doc["schema"] == "diffkern.benchmarks.scheduler_speed/1"
    assert [r["class"] for r in saved["rows"]] == ["DDIM", "EulerAncestral", "DPMSolverMultistep"]
    for r in saved["rows"]:
        for impl in ("stock", "fused"):
            e = r[impl]
            assert e["ms_per_step"]["median_ms"] > 0 and e["host_us_per_step"] > 0
        assert r["fused"]["syncs_per_step"] == 0 and r["stock"]["syncs_per_step"] > 0
    assert "| cpu | DDIM | 1x4x8x8 |" in capsys.readouterr().out


@pytest.mark.parametrize("eta,clipped", [(0.0, False), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_thresholding_equals_stock(prediction, eta, clipped):
    """DDIM with dynamic thresholding (issue 22): whole loops against stock, same noise, on a
    model output large enough that the thresholds act (x0 beyond the quantile's clamp at 1);
    no host read per step (the quantile stays on the device)."""
    cfg = dict(thresholding=True, prediction_type=prediction, dynamic_thresholding_ratio=0.9,
               sample_max_value=2.0)
    stock = DDIMScheduler(**cfg)
    fused = FusedDDIMScheduler.from_config(stock.config)
    outs = []
    for s in (stock, fused):
        s.set_timesteps(12)
        g, gm = gen(1), gen(0)
        x = 3 * torch.randn(SHAPE, generator=gm)
        with CountSyncs() as c:
            for t in s.timesteps:
                m = 2 * torch.tanh(x) + torch.randn(SHAPE, generator=gm)
                out = s.step(m, t, x, eta=eta, use_clipped_model_output=clipped, generator=g)
                x = out.prev_sample
        outs.append((x, out.pred_original_sample, c.n))
    (a, a0, _), (b, b0, syncs) = outs
    assert max_rel_err(b, a) <= TOL and max_rel_err(b0, a0) <= TOL
    assert syncs == 0


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_per_token_timesteps_equal_stock(stochastic):
    """FlowMatch per_token_timesteps (LTX-condition: tokens at their own sigma): stock's own
    step, so the loop is stock's bitwise, noise included, for the same seed."""
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)
    outs = []
    for s in (stock, fused):
        s.set_timesteps(8)
        g, gm = gen(1), gen(0)
        x = torch.randn(2, 16, 4, generator=gm)
        for t in s.timesteps:
            # the first 4 tokens held at a lower timestep (a conditioning frame)
            ptt = t.expand(2, 16).clone()
            ptt[:, :4] = torch.minimum(t, torch.tensor(100.0))
            x = s.step(torch.randn(2, 16, 4, generator=gm), t, x, generator=g, per_token_timesteps=ptt).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
