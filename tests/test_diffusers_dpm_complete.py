"""FusedDPMSolverMultistepScheduler complete (issue 22): whole loops against stock
DPMSolverMultistepScheduler over every algorithm type x solver type x order x prediction
type x sigma kind, the options that change the order logic or the conversion, the SDE
types' noise (same seed, same result), and (B,) timesteps.

The oracle is stock itself run in float64: its sigma table upcast and ``torch.float32``
meaning float64 in its module (stock casts the sample to float32 every step), the SDE
noise still drawn as stock draws it (float32, from the same generator) and upcast. Stock's
own float32 run is not the oracle: its coefficients (lambda differences, 1/r0) are formed
in float32 and are the larger error at small step sizes.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
import warnings

import pytest
import torch
from conftest import max_rel_err
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from diffkern.integrations.diffusers import FusedDPMSolverMultistepScheduler  # noqa: E402

TOL = 1e-5
SHAPE = (3, 3, 5, 7)  # odd sizes
MOD = sys.modules[DPMSolverMultistepScheduler.__module__]


class _Torch64:
    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def stock_in_float64():
    """Stock's step in float64; its noise stays stock's float32 draw, upcast."""
    real_torch, real_randn = MOD.torch, MOD.randn_tensor

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        return real_randn(shape, generator=generator, device=device, dtype=real_torch.float32).to(dtype)

    MOD.torch, MOD.randn_tensor = _Torch64(), randn
    try:
        yield
    finally:
        MOD.torch, MOD.randn_tensor = real_torch, real_randn


def model(x, k, channels=None):
    """A deterministic stand-in for the network: a smooth nonlinear function of the
    sample (so the history terms differ from step to step), the same for both runs."""
    m = torch.sin(x.double() * 1.3 + 0.1 * k) * 0.8 + 0.1 * torch.cos(x.double() * 0.7)
    if channels is not None:  # learned variance: the extra channels are not epsilon
        m = torch.cat([m, torch.full_like(m, 7.0)], 1)[:, :channels]
    return m


def run(cls, cfg, n, dtype, *, seed=0, noise=None, noncontig=False, channels=None, m_scale=1.0,
        stepping=contextlib.nullcontext):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated noise-space types
        s = cls(**cfg)
    s.set_timesteps(n)
    if dtype == torch.float64:
        s.sigmas = s.sigmas.double()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    if noncontig:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        assert not x.is_contiguous()
    gen = torch.Generator().manual_seed(seed)
    for k, t in enumerate(s.timesteps):
        m = (model(x, k, channels) * m_scale).to(dtype)
        kw = dict(variance_noise=noise[k].to(dtype)) if noise is not None else dict(generator=gen)
        with stepping():
            x = s.step(m, t, x, **kw).prev_sample
    return x


def oracle(cfg, n, **kw):
    # only the steps in float64: the schedule is stock's float32 one (built in float64,
    # its sigmas would differ by float32 rounding)
    return run(DPMSolverMultistepScheduler, cfg, n, torch.float64, stepping=stock_in_float64, **kw)


def fused(cfg, n, dtype=torch.float32, **kw):
    return run(FusedDPMSolverMultistepScheduler, cfg, n, dtype, **kw)


ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
GRID = [
    dict(algorithm_type=a, solver_type=st, solver_order=o, prediction_type=p, use_flow_sigmas=fl)
    for a, st, o, p, fl in itertools.product(ALGORITHMS, ("midpoint", "heun"), (1, 2, 3),
                                             ("epsilon", "sample", "v_prediction", "flow_prediction"), (False, True))
    if not (a == "sde-dpmsolver" and o == 3) and not (p == "flow_prediction" and a not in ("dpmsolver++",
                                                                                         "sde-dpmsolver++"))
]
for c in GRID:
    if c["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
        c["final_sigmas_type"] = "sigma_min"  # stock refuses "zero" for the noise-space types


def cid(c):
    return ",".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("cfg", GRID, ids=cid)
def test_grid_whole_loop_matches_stock_float64(cfg):
    """12 steps (the warm-up, two order-3 steps and the lower-order final steps)."""
    ref = oracle(cfg, 12)
    assert torch.isfinite(ref).all()
    assert max_rel_err(fused(cfg, 12), ref) <= TOL
    # in float64 the fused loop is stock's arithmetic up to the coefficients' rounding
    assert max_rel_err(fused(cfg, 12, torch.float64), ref) <= 1e-12


OPTIONS = [
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.2),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, solver_order=3),
    dict(thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", sample_max_value=1.3),
    dict(thresholding=True, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"),
    dict(euler_at_final=True, solver_order=3, final_sigmas_type="sigma_min"),
    dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3),
    dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++", solver_type="heun"),
    dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
    dict(use_lu_lambdas=True, solver_order=3),
    dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
    # (not order 3: stock's last step has h = 0 at 20 steps (a repeated sigma) and gives NaN)
    dict(use_exponential_sigmas=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    # Sana: flow sigmas, flow prediction, shift
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, algorithm_type="sde-dpmsolver++"),
]


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("cfg", OPTIONS, ids=cid)
def test_options_whole_loop_matches_stock_float64(cfg, n):
    """Thresholding clamps x0 to a per-sample quantile: the model output is scaled so the
    clamp is active (x0 beyond the bound)."""
    m_scale = 3.0 if cfg.get("thresholding") else 1.0
    ref = oracle(cfg, n, m_scale=m_scale)
    assert max_rel_err(fused(cfg, n, m_scale=m_scale), ref) <= TOL
    assert max_rel_err(fused(cfg, n, noncontig=True, m_scale=m_scale), ref) <= TOL


def test_learned_range_takes_the_epsilon_half():
    cfg = dict(variance_type="learned_range", solver_order=3)
    ref = oracle(cfg, 10, channels=6)
    assert max_rel_err(fused(cfg, 10, channels=6), ref) <= TOL


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_same_seed_same_result_as_stock(algorithm):
    """The noise is stock's draw from the same generator: the float32 loops agree with
    each other (a different draw would be O(1) apart), and the generator ends in the
    same state (the same number of draws)."""
    cfg = dict(algorithm_type=algorithm, solver_order=2)
    if algorithm == "sde-dpmsolver":
        cfg["final_sigmas_type"] = "sigma_min"
    a = run(DPMSolverMultistepScheduler, cfg, 10, torch.float32, seed=7)
    b = fused(cfg, 10, seed=7)
    ref = oracle(cfg, 10, seed=7)
    assert max_rel_err(b, ref) <= TOL
    # from stock's float32 run no further than the oracle bound plus stock's own distance
    # from the oracle (its float32 coefficients; measured 1.6e-6 / 6.4e-6 here)
    assert max_rel_err(b, a) <= TOL + max_rel_err(a, ref)
    assert max_rel_err(fused(cfg, 10, seed=8), a) > 1e-2  # the test sees the noise


def test_sde_variance_noise_is_used_as_given():
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(10)]
    ref = oracle(cfg, 10, noise=noise)
    assert max_rel_err(fused(cfg, 10, noise=noise), ref) <= TOL


@pytest.mark.parametrize("cfg", [dict(solver_order=3, final_sigmas_type="sigma_min"),
                                 dict(algorithm_type="sde-dpmsolver++", solver_order=2),
                                 dict(thresholding=True, solver_order=2, algorithm_type="dpmsolver",
                                      final_sigmas_type="sigma_min")], ids=cid)
def test_per_sample_timesteps_equal_separate_steps(cfg):
    """A (B,) timestep: sample b takes position i_b's coefficients with the shared
    history, as a scalar step at i_b does (the last position included: its order cap)."""
    n = 10
    s = FusedDPMSolverMultistepScheduler(**cfg)
    s.set_timesteps(n)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    for k in range(3):  # history for order 3
        x = s.step(model(x, k).float() * 3, s.timesteps[k], x, generator=g).prev_sample
    pos = [3, 6, n - 1]
    m = model(x, 9).float() * 3
    z = torch.randn(SHAPE, generator=g)
    kw = dict(variance_noise=z) if "sde" in cfg.get("algorithm_type", "") else {}
    batched = copy.deepcopy(s)
    got = batched.step(m, s.timesteps[pos], x, **kw).prev_sample
    for b, i in enumerate(pos):
        one = copy.deepcopy(s)
        one._step_index = i
        want = one.step(m, s.timesteps[i], x, **kw).prev_sample
        assert max_rel_err(got[b], want[b]) <= 1e-6
        assert max_rel_err(batched.model_outputs[-1][b], one.model_outputs[-1][b]) <= 1e-6


def test_refused_configs_name_the_option():
    with pytest.raises(NotImplementedError, match="solver_order"):
        FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                         final_sigmas_type="sigma_min")
    with pytest.raises(NotImplementedError, match="prediction_type"):
        FusedDPMSolverMultistepScheduler(algorithm_type="dpmsolver", prediction_type="flow_prediction",
                                         final_sigmas_type="sigma_min")


# ---- the inverse and the EDM schedulers: the same coefficient code --------------------
from diffusers import DPMSolverMultistepInverseScheduler, EDMDPMSolverMultistepScheduler  # noqa: E402

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedDPMSolverMultistepInverseScheduler,
    FusedEDMDPMSolverMultistepScheduler,
)


@contextlib.contextmanager
def module_in_float64(mod, native_noise=False):
    """Stock's step in float64 in ``mod``. These stocks draw noise in the model dtype: the
    float32 draw, upcast (what a float32 run draws), or with ``native_noise`` the float64
    draw (what a float64 run draws)."""
    real_torch, real_randn = mod.torch, mod.randn_tensor

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        if native_noise:
            return real_randn(shape, generator=generator, device=device, dtype=dtype)
        return real_randn(shape, generator=generator, device=device, dtype=real_torch.float32).to(dtype)

    mod.torch, mod.randn_tensor = _Torch64(), randn
    try:
        yield
    finally:
        mod.torch, mod.randn_tensor = real_torch, real_randn


def run_pair(stock_cls, fused_cls, cfg, n, **kw):
    """(fused float32 - oracle, fused float64 - oracle) relative errors. The float64 loops
    draw float64 noise (stock: the model dtype), so their oracle draws as stock does."""
    mod = sys.modules[stock_cls.__module__]
    ref = run(stock_cls, cfg, n, torch.float64, stepping=lambda: module_in_float64(mod), **kw)
    assert torch.isfinite(ref).all()
    ref64 = ref
    if "sde" in cfg.get("algorithm_type", ""):
        ref64 = run(stock_cls, cfg, n, torch.float64, stepping=lambda: module_in_float64(mod, native_noise=True),
                    **kw)
    return (max_rel_err(run(fused_cls, cfg, n, torch.float32, **kw), ref),
            max_rel_err(run(fused_cls, cfg, n, torch.float64, **kw), ref64))


INVERSE = [
    dict(algorithm_type=a, solver_order=o, prediction_type=p, solver_type=st)
    for a, o, p, st in itertools.product(("dpmsolver++", "dpmsolver"), (1, 2, 3), ("epsilon", "v_prediction"),
                                         ("midpoint", "heun"))
] + [dict(use_karras_sigmas=True, solver_order=3), dict(thresholding=True, prediction_type="sample", m_scale=3.0),
     dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     dict(lower_order_final=False, solver_type="heun")]


@pytest.mark.parametrize("cfg", INVERSE, ids=cid)
def test_inverse_whole_loop_matches_stock_float64(cfg):
    cfg = dict(cfg)
    m_scale = cfg.pop("m_scale", 0.3)  # inversion runs toward noise: a small model output keeps it finite
    e32, e64 = run_pair(DPMSolverMultistepInverseScheduler, FusedDPMSolverMultistepInverseScheduler, cfg, 10,
                        m_scale=m_scale)
    assert e32 <= TOL and e64 <= 1e-12


EDM = [
    dict(algorithm_type=a, solver_order=o, prediction_type=p, solver_type=st)
    for a, o, p, st in itertools.product(("dpmsolver++", "sde-dpmsolver++"), (1, 2, 3), ("epsilon", "v_prediction"),
                                         ("midpoint", "heun"))
    if not (a == "sde-dpmsolver++" and o == 3)
] + [dict(sigma_schedule="exponential", solver_order=3), dict(final_sigmas_type="sigma_min", euler_at_final=True),
     dict(thresholding=True, sample_max_value=1.5, m_scale=3.0)]


@pytest.mark.parametrize("cfg", EDM, ids=cid)
def test_edm_whole_loop_matches_stock_float64(cfg):
    cfg = dict(cfg)
    m_scale = cfg.pop("m_scale", 1.0)
    e32, e64 = run_pair(EDMDPMSolverMultistepScheduler, FusedEDMDPMSolverMultistepScheduler, cfg, 12,
                        m_scale=m_scale)
    assert e32 <= TOL and e64 <= 1e-12


def test_edm_and_inverse_refusals_name_the_option():
    with pytest.raises(NotImplementedError, match="prediction_type"):
        FusedEDMDPMSolverMultistepScheduler(prediction_type="sample")
    with pytest.raises(NotImplementedError, match="solver_order"):
        FusedEDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    for algorithm in ("sde-dpmsolver++", "sde-dpmsolver"):
        with pytest.raises(NotImplementedError, match="algorithm_type"):
            FusedDPMSolverMultistepInverseScheduler(algorithm_type=algorithm)


# ---- CogVideoX's DPM scheduler ---------------------------------------------------------
from diffusers import CogVideoXDPMScheduler  # noqa: E402

from diffkern.integrations.diffusers import FusedCogVideoXDPMScheduler  # noqa: E402

COG = sys.modules[CogVideoXDPMScheduler.__module__]


def cog_loop(cls, cfg, dtype, *, seed=0, n=10, upcast=False, noise32=False):
    """The CogVideoX pipeline's loop: the previous x0 and the previous timestep go back in."""
    s = cls(**cfg)
    s.set_timesteps(n)
    if upcast:
        s.alphas_cumprod = s.alphas_cumprod.double()
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    real = COG.randn_tensor

    def randn(shape, generator=None, device=None, dtype=None, **kw):  # the float32 draw, upcast
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    old, ts = None, s.timesteps
    if noise32:
        COG.randn_tensor = randn
    try:
        for i, t in enumerate(ts):
            m = model(x, i).to(dtype)
            x, old = s.step(m, old, t, ts[i - 1] if i > 0 else None, x, generator=g, return_dict=False)
    finally:
        COG.randn_tensor = real
    return x, old


@pytest.mark.parametrize("cfg", [dict(), dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                timestep_spacing="trailing"),
                                 dict(beta_schedule="linear", set_alpha_to_one=False),
                                 dict(prediction_type="sample", timestep_spacing="linspace")], ids=cid)
def test_cogvideox_dpm_loop_matches_stock(cfg):
    """Same seed, same video: stock's two draws on second-order steps are made; float32
    within TOL of stock run in float64 (on the float32 draws), float64 at 1e-12."""
    ref, ref_x0 = cog_loop(CogVideoXDPMScheduler, cfg, torch.float64, upcast=True, noise32=True)
    got, got_x0 = cog_loop(FusedCogVideoXDPMScheduler, cfg, torch.float32)
    assert max_rel_err(got, ref) <= TOL and max_rel_err(got_x0, ref_x0) <= TOL
    ref64, _ = cog_loop(CogVideoXDPMScheduler, cfg, torch.float64, upcast=True)
    assert max_rel_err(cog_loop(FusedCogVideoXDPMScheduler, cfg, torch.float64)[0], ref64) <= 1e-12
    assert max_rel_err(cog_loop(FusedCogVideoXDPMScheduler, cfg, torch.float32, seed=1)[0], ref) > 1e-2


# ---- no host syncs per step ----------------------------------------------------------------
class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,cfg", [
    (FusedDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
    (FusedDPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    (FusedDPMSolverMultistepInverseScheduler, dict(solver_order=3)),
    (FusedEDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
], ids=lambda v: v.__name__ if isinstance(v, type) else cid(v))
def test_no_host_sync_per_step(cls, cfg):
    """After set_timesteps, a whole loop (scale_model_input included) and a (B,) step
    read no tensor on the host; stock's loop does (the counter counts)."""
    for c, want_zero in ((cls, True), (cls._dk_stock, False)):
        s = c(**cfg)
        s.set_timesteps(8)
        x = torch.randn(SHAPE)
        g = torch.Generator().manual_seed(0)
        with CountSyncs() as n:
            for t in s.timesteps:
                x = s.step(torch.randn(SHAPE), t, s.scale_model_input(x, t), generator=g).prev_sample
            if want_zero:
                s.step(torch.randn(SHAPE), s.timesteps[[1, 2, 3]], x, generator=g)
        assert (n.n == 0) == want_zero


def test_cogvideox_no_host_sync_per_step():
    for c, want_zero in ((FusedCogVideoXDPMScheduler, True), (CogVideoXDPMScheduler, False)):
        s = c()
        s.set_timesteps(8)
        with CountSyncs() as n:
            x, old, ts = torch.randn(SHAPE), None, s.timesteps
            for i, t in enumerate(ts):
                x, old = s.step(torch.randn(SHAPE), old, t, ts[i - 1] if i > 0 else None, x, return_dict=False)
        assert (n.n == 0) == want_zero


def test_cogvideox_output_types_are_stocks():
    """First-order steps return a tuple whatever return_dict says (stock's quirk); a
    second-order step with return_dict returns stock's output class."""
    out = {}
    for c in (CogVideoXDPMScheduler, FusedCogVideoXDPMScheduler):
        s = c()
        s.set_timesteps(4)
        x, ts = torch.randn(SHAPE), s.timesteps
        a = s.step(torch.randn(SHAPE), None, ts[0], None, x, return_dict=True)
        b = s.step(torch.randn(SHAPE), a[1], ts[1], ts[0], a[0], return_dict=True)
        out[c] = (type(a), type(b))
    assert out[CogVideoXDPMScheduler] == out[FusedCogVideoXDPMScheduler]


def test_edm_scale_model_input_matches_stock():
    stock, fused = EDMDPMSolverMultistepScheduler(), FusedEDMDPMSolverMultistepScheduler()
    stock.set_timesteps(6)
    fused.set_timesteps(6)
    x = torch.randn(SHAPE)
    for k in range(3):
        a = stock.scale_model_input(x, stock.timesteps[k])
        assert max_rel_err(fused.scale_model_input(x, fused.timesteps[k]), a) <= 1e-6
        stock._step_index, fused._step_index = k + 1, k + 1
    b = fused.scale_model_input(x, fused.timesteps[[0, 3, 5]])
    for j, k in enumerate((0, 3, 5)):
        s2 = EDMDPMSolverMultistepScheduler()
        s2.set_timesteps(6)
        s2._step_index = k
        assert max_rel_err(b[j], s2.scale_model_input(x, s2.timesteps[k])[j]) <= 1e-6


@pytest.mark.parametrize("cls,cfg", [
    (FusedDPMSolverMultistepScheduler, dict(solver_order=3)),
    (FusedDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    (FusedEDMDPMSolverMultistepScheduler, dict()),
], ids=lambda v: v.__name__ if isinstance(v, type) else cid(v))
def test_compiled_loop_body_has_no_graph_breaks(cls, cfg):
    """torch.compile(fullgraph=True) of scale + model + step: no graph break (the step
    takes its coefficient rows from the device tables), the eager loop's numbers. One
    graph per order of the warm-up (the history length is part of the graph)."""
    torch._dynamo.reset()
    s = cls(**cfg)
    s.set_timesteps(6)
    eager = copy.deepcopy(s)
    sde = "sde" in cfg.get("algorithm_type", "")

    def body(s, x, t, z):
        m = torch.sin(s.scale_model_input(x, t)) * 0.5
        return (s.step(m, t, x, variance_noise=z) if sde else s.step(m, t, x)).prev_sample

    comp = torch.compile(body, fullgraph=True, backend="eager")
    x = xe = torch.randn(SHAPE)
    g = torch.Generator().manual_seed(0)
    for t, te in zip(s.timesteps, eager.timesteps, strict=True):
        z = torch.randn(SHAPE, generator=g)
        x, xe = comp(s, x, t, z), body(eager, xe, te, z)
    assert max_rel_err(x, xe) <= 1e-6


@pytest.mark.parametrize("stock_cls,fused_cls", [
    (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler),
    (DPMSolverMultistepInverseScheduler, FusedDPMSolverMultistepInverseScheduler),
    (EDMDPMSolverMultistepScheduler, FusedEDMDPMSolverMultistepScheduler),
], ids=lambda c: c.__name__)
def test_add_noise_matches_stock_without_syncs(stock_cls, fused_cls):
    stock, fused = stock_cls(), fused_cls()
    stock.set_timesteps(7)
    fused.set_timesteps(7)
    g = torch.Generator().manual_seed(2)
    x0, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    pick = [0, 3, 6]
    want = stock.add_noise(x0, z, stock.timesteps[pick])
    with CountSyncs() as n:
        got = fused.add_noise(x0, z, fused.timesteps[pick])
    assert n.n == 0
    assert max_rel_err(got, want) <= 1e-6
