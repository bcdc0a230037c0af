"""More fused diffusers drop-ins (issue 23): LMS, KDPM2, KDPM2 ancestral, DEIS, each
against its stock class over whole loops, with the harness of test_fused_schedulers
(the same model outputs and noise; every output within 1e-5 relative of stock float32,
or where stock's own float32 rounding is the larger error, of stock run in float64)."""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import test_fused_noise as NZ
import torch
from conftest import gen, max_rel_err
from test_fused_schedulers import CountSyncs, opt_id, rand, run_loops

diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
from diffusers import (  # noqa: E402
    DEISMultistepScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    SASolverScheduler,
)

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedDEISMultistepScheduler,
    FusedKDPM2AncestralDiscreteScheduler,
    FusedKDPM2DiscreteScheduler,
    FusedLMSDiscreteScheduler,
    FusedSASolverScheduler,
)
from diffkern.integrations.diffusers.lms import lms_coefficients  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SIGMA_OPTIONS = [dict(), dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                 dict(use_beta_sigmas=True)]


# ---- LMS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", SIGMA_OPTIONS, ids=opt_id)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lms_loop_matches_stock(monkeypatch, prediction_type, spacing, options):
    cfg = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, **options)
    run_loops(monkeypatch, LMSDiscreteScheduler, FusedLMSDiscreteScheduler, cfg, n_steps=13)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_lms_step_order_matches_stock(monkeypatch, order):
    run_loops(monkeypatch, LMSDiscreteScheduler, FusedLMSDiscreteScheduler, dict(), n_steps=11,
              step_kw=dict(order=order))


def test_lms_coefficients_equal_stock_integrals():
    """The Gauss-Legendre coefficients are stock's scipy.integrate.quad integrals (on the
    same float32 sigmas, upcast: quad's 21-point rule is exact on these polynomials too)."""
    stock = LMSDiscreteScheduler(use_karras_sigmas=True)
    stock.set_timesteps(9)
    stock.sigmas = stock.sigmas.double()
    sig = stock.sigmas.tolist()
    for order in (1, 2, 4, 6):
        ours = lms_coefficients(sig, order, range(len(sig) - 1))
        for t in range(len(sig) - 1):
            eff = min(t + 1, order)
            want = [float(stock.get_lms_coefficient(eff, t, j)) for j in range(eff)]
            scale = max(abs(v) for v in want)
            assert len(ours[t]) == eff
            assert max(abs(a - b) for a, b in zip(ours[t], want, strict=True)) <= 1e-12 * scale, (order, t)


def test_lms_begin_index_midway_matches_stock():
    """Started mid-schedule (img2img): stock's history is shorter than the order it asks
    for, and it zips the first coefficients with the derivatives it has."""
    g = gen(3)
    stock, fused = LMSDiscreteScheduler(**SD), FusedLMSDiscreteScheduler(**SD)
    for s in (stock, fused):
        s.set_timesteps(12)
        s.set_begin_index(5)
    xs = xf = rand(g, (2, 3, 5, 7)).float() * 3
    for t, tf in zip(stock.timesteps[5:], fused.timesteps[5:], strict=True):
        m = rand(g, (2, 3, 5, 7)).float()
        a = stock.step(m, t, stock.scale_model_input(xs, t))
        b = fused.step(m, tf, fused.scale_model_input(xf, tf))
        assert max_rel_err(b.prev_sample, a.prev_sample) <= 1e-5
        xs, xf = a.prev_sample, b.prev_sample


# ---- every class --------------------------------------------------------------------------
CLASSES = {  # name: (fused class, config, steps)
    "lms": (FusedLMSDiscreteScheduler, dict(SD, prediction_type="v_prediction"), 10),
    "kdpm2": (FusedKDPM2DiscreteScheduler, dict(use_karras_sigmas=True), 6),
    "kdpm2_ancestral": (FusedKDPM2AncestralDiscreteScheduler, dict(prediction_type="v_prediction"), 6),
    "deis": (FusedDEISMultistepScheduler, dict(solver_order=3), 10),
    "sasolver": (FusedSASolverScheduler, dict(predictor_order=3, corrector_order=3), 10),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_no_host_sync_per_step(name):
    """After set_timesteps: no aten._local_scalar_dense in a whole loop (stock reads its
    timestep on the host every step: the counter counts)."""
    cls, cfg, n = CLASSES[name]
    for sched, want_zero in ((cls(**cfg), True), (cls._dk_stock(**cfg), False)):
        sched.set_timesteps(n)
        x = torch.randn(2, 3, 8, 8)
        g = gen(0)
        with CountSyncs() as c:
            for t in sched.timesteps:
                x = sched.scale_model_input(x, t)
                gkw = dict(generator=g) if "generator" in inspect.signature(sched.step).parameters else {}
                x = sched.step(torch.randn(2, 3, 8, 8), t, x, **gkw).prev_sample
        assert (c.n == 0) == want_zero, (type(sched).__name__, c.n)


@pytest.mark.parametrize("name", list(CLASSES))
def test_saved_config_is_stocks(name, tmp_path):
    cls, cfg, _ = CLASSES[name]
    sched = cls(**cfg)
    sched.save_config(tmp_path)
    back = cls._dk_stock.from_pretrained(tmp_path)
    public = {k: v for k, v in sched.config.items() if not k.startswith("_")}
    assert type(back) is cls._dk_stock and {k: back.config[k] for k in public} == public
    assert '"_class_name": "' + cls._dk_stock.__name__ + '"' in (tmp_path / "scheduler_config.json").read_text()


# ---- KDPM2, KDPM2 ancestral -------------------------------------------------------------
@pytest.mark.parametrize("options", SIGMA_OPTIONS, ids=opt_id)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kdpm2_loop_matches_stock(monkeypatch, prediction_type, spacing, options):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, **options)
    run_loops(monkeypatch, KDPM2DiscreteScheduler, FusedKDPM2DiscreteScheduler, cfg, n_steps=9)


@pytest.mark.parametrize("options", SIGMA_OPTIONS, ids=opt_id)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kdpm2_ancestral_loop_matches_stock(monkeypatch, prediction_type, spacing, options):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1, **options)
    draws = run_loops(monkeypatch, KDPM2AncestralDiscreteScheduler, FusedKDPM2AncestralDiscreteScheduler, cfg,
                      n_steps=9)
    assert draws == 8  # one per second stage


def test_kdpm2_ancestral_same_seed_same_result():
    """Stock draws its noise from the generator; the fused loop draws the same numbers."""
    outs = []
    for cls in (KDPM2AncestralDiscreteScheduler, FusedKDPM2AncestralDiscreteScheduler):
        s = cls(**SD)
        s.set_timesteps(7)
        g, gm = gen(11), gen(12)
        x = torch.randn(2, 4, 9, 5, generator=gm) * s.init_noise_sigma
        for t in s.timesteps:
            m = torch.sin(s.scale_model_input(x, t) * 1.7) + 0.05 * x
            x = s.step(m, t, x, generator=g).prev_sample
        outs.append(x)
    assert max_rel_err(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("cls", [FusedKDPM2DiscreteScheduler, FusedKDPM2AncestralDiscreteScheduler])
def test_kdpm2_sample_prediction_refused(cls):
    with pytest.raises(NotImplementedError, match="prediction_type='sample'"):
        cls(prediction_type="sample")


# ---- DEIS ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n_steps", [8, 16])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_deis_loop_matches_stock(monkeypatch, prediction_type, solver_order, n_steps):
    cfg = dict(SD, prediction_type=prediction_type, solver_order=solver_order)
    run_loops(monkeypatch, DEISMultistepScheduler, FusedDEISMultistepScheduler, cfg, n_steps=n_steps)


DEIS_OPTIONS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
                dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
                dict(lower_order_final=False), dict(beta_schedule="squaredcos_cap_v2"),
                dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
                dict(thresholding=True, prediction_type="sample", sample_max_value=1.5)]


@pytest.mark.parametrize("options", DEIS_OPTIONS, ids=opt_id)
def test_deis_options_match_stock(monkeypatch, options):
    cfg = dict(dict(solver_order=3), **options)
    m_scale = 2.0 if options.get("thresholding") else 1.0
    run_loops(monkeypatch, DEISMultistepScheduler, FusedDEISMultistepScheduler, cfg, n_steps=10, m_scale=m_scale)


# ---- SA-Solver ------------------------------------------------------------------------------
@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (3, 3), (3, 1), (1, 3)], ids=str)
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sasolver_loop_matches_stock(monkeypatch, prediction_type, algorithm_type, orders):
    cfg = dict(SD, prediction_type=prediction_type, algorithm_type=algorithm_type, predictor_order=orders[0],
               corrector_order=orders[1])
    draws = run_loops(monkeypatch, SASolverScheduler, FusedSASolverScheduler, cfg, n_steps=10)
    assert draws == 10  # stock draws every step (the corrector reuses it)


SA_OPTIONS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
              dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
              dict(lower_order_final=False), dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
              dict(tau_func=lambda t: 0.5 if 100 <= t <= 900 else 0.0),
              dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
              dict(thresholding=True, prediction_type="sample", sample_max_value=1.5)]


@pytest.mark.parametrize("options", SA_OPTIONS, ids=lambda o: opt_id({k: v for k, v in o.items() if k != "tau_func"})
                         + (",tau_func" if "tau_func" in o else ""))
def test_sasolver_options_match_stock(monkeypatch, options):
    cfg = dict(dict(predictor_order=3, corrector_order=2), **options)
    m_scale = 2.0 if options.get("thresholding") else 1.0
    run_loops(monkeypatch, SASolverScheduler, FusedSASolverScheduler, cfg, n_steps=10, m_scale=m_scale)


def test_sasolver_same_seed_same_result(monkeypatch):
    """With a generator the fused loop draws stock's numbers: it ends where stock run in
    float64 on the same float32 draws ends (stock float32 is itself ~1e-4 away here: its
    coefficients are float32), and leaves the generator where stock leaves it."""
    mod = sys.modules[SASolverScheduler.__module__]
    real = mod.randn_tensor

    def randn_f32(shape, generator=None, device=None, dtype=None, **kw):
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    outs, states = [], []
    for cls, dtype in ((SASolverScheduler, torch.float32), (SASolverScheduler, torch.float64),
                       (FusedSASolverScheduler, torch.float32)):
        s = cls(**SD, predictor_order=3, corrector_order=3)
        s.set_timesteps(9)
        if dtype == torch.float64:
            s.sigmas = s.sigmas.double()
            monkeypatch.setattr(mod, "randn_tensor", randn_f32)
        g, gm = gen(21), gen(22)
        x = torch.randn(2, 4, 9, 5, generator=gm).to(dtype)
        for t in s.timesteps:
            x = s.step(torch.sin(x * 1.7) + 0.05 * x, t, x, generator=g).prev_sample
        monkeypatch.setattr(mod, "randn_tensor", real)
        outs.append(x)
        states.append(g.get_state())
    assert torch.equal(states[2], states[0])
    assert max_rel_err(outs[2], outs[1]) <= 1e-5


@pytest.mark.parametrize("cfg,option", [(dict(predictor_order=4), "predictor_order"),
                                        (dict(corrector_order=4), "corrector_order"),
                                        (dict(thresholding=True, algorithm_type="noise_prediction"), "thresholding"),
                                        (dict(dk_noise="kernel"), "dk_noise")])
def test_sasolver_refused_configs(cfg, option):
    with pytest.raises(NotImplementedError, match=option):
        FusedSASolverScheduler(**cfg)


# ---- noise: same seed, same image; opt-in modes ------------------------------------------------
STOCHASTIC = {  # name: (fused class, config, steps)
    "kdpm2_ancestral": (FusedKDPM2AncestralDiscreteScheduler, dict(prediction_type="v_prediction"), 6),
    "sasolver": (FusedSASolverScheduler, dict(SD, predictor_order=3, tau_func=lambda t: 1.0), 8),
}


def _pair(name):
    cls, cfg, steps = STOCHASTIC[name]
    stock = cls._dk_stock(**cfg)
    return stock, cls.from_config(stock.config, **({"tau_func": cfg["tau_func"]} if "tau_func" in cfg else {})), steps


@pytest.mark.parametrize("kind", ["one", "list", "global"])
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_whole_loop_equals_stock_for_the_same_seed(name, kind, monkeypatch):
    """stock's randn_tensor calls (spied: the same arguments, as many), the generators left
    where stock leaves them, and the same result."""
    stock, fused, steps = _pair(name)
    mod = sys.modules[type(fused)._dk_stock.__module__]
    real, calls = mod.randn_tensor, []

    def spy(shape, generator=None, device=None, dtype=None, **k):
        calls.append((tuple(shape), torch.device(device), dtype))
        return real(shape, generator=generator, device=device, dtype=dtype, **k)

    monkeypatch.setattr(mod, "randn_tensor", spy)
    outs, states, counts = [], [], []
    for sched in (stock, fused):
        torch.manual_seed(123)
        g = NZ.generators(kind)
        outs.append(NZ.run_loop(sched, steps, {}, g))
        states.append(NZ.gen_state(g))
        counts.append(list(calls))
        calls.clear()
    assert counts[0] == counts[1] and len(counts[0]) >= steps - 1
    assert torch.equal(states[0], states[1])
    assert max_rel_err(outs[1], outs[0]) <= 1e-5


def test_kdpm2_ancestral_kernel_noise_is_opt_in_and_seeded(monkeypatch):
    stock, default, steps = _pair("kdpm2_ancestral")
    fused = type(default).from_config(stock.config, dk_noise="kernel")
    NZ._refuse_stock_randn(monkeypatch, fused)
    a = NZ.run_loop(copy.deepcopy(fused), steps, {}, gen(1))
    b = NZ.run_loop(copy.deepcopy(fused), steps, {}, gen(1))
    c = NZ.run_loop(copy.deepcopy(fused), steps, {}, gen(2))
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_keyed_noise_is_batch_invariant(name, monkeypatch):
    stock, default, steps = _pair(name)
    cls = type(default)
    extra = {"tau_func": STOCHASTIC[name][1]["tau_func"]} if "tau_func" in STOCHASTIC[name][1] else {}
    seeds = torch.tensor([11, 22, 33], dtype=torch.int64)
    NZ._refuse_stock_randn(monkeypatch, default)
    shape = (3,) + NZ.SHAPE[1:]
    whole = NZ.run_loop(cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds, **extra), steps, {}, gen(1),
                        shape)
    for b in (0, 2):
        one = cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds[b:b + 1], **extra)
        assert torch.equal(NZ._loop_sample(one, steps, {}, shape, b), whole[b:b + 1])
    other = NZ.run_loop(cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds + 1, **extra), steps, {},
                        None, shape)
    assert not torch.equal(other, whole)
