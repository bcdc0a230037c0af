"""Same seed, same image: the Fused schedulers' noise against stock's (issue 22).

By default a fused step that adds noise draws it with stock's own ``randn_tensor`` call
(same shape, dtype, device, generator, order) and hands it to the fused op, so a whole
loop equals stock's for the same seed -- with one generator, a list of them, or torch's
global RNG -- and leaves the generators where stock leaves them. In-kernel (``"kernel"``)
and per-sample keyed (``"keyed"``) noise are opt-in and stay out of the saved config.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import gen, max_rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedFlowMatchEulerDiscreteScheduler,
    FusedLCMScheduler,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 3, 8, 8)
# Each fused step is within a few float32 ulps of stock's (the coefficients are formed in
# float64, stock's in float32); with the same noise the chains stay together: measured
# <= 4.4e-7 relative over these loops, so 1e-5 has a margin of 20.
TOL = 1e-5

# name: (fused class, config, step kwargs, steps)
STOCHASTIC = {
    "ddpm": (FusedDDPMScheduler, dict(), dict(), 12),
    "ddim_eta1": (FusedDDIMScheduler, dict(prediction_type="v_prediction"), dict(eta=1.0), 12),
    "euler_a": (FusedEulerAncestralDiscreteScheduler, dict(), dict(), 12),
    "lcm": (FusedLCMScheduler, dict(), dict(), 6),
    "flow_stochastic": (FusedFlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True, shift=3.0), dict(), 12),
}
GENERATORS = ("one", "list", "global")


def generators(kind):
    if kind == "one":
        return torch.Generator().manual_seed(5)
    if kind == "list":
        return [torch.Generator().manual_seed(10 + b) for b in range(SHAPE[0])]
    return None


def gen_state(g):
    if g is None:
        return torch.get_rng_state()
    if isinstance(g, list):
        return torch.cat([x.get_state() for x in g])
    return g.get_state()


def run_loop(sched, steps, kw, g, shape=SHAPE):
    """A whole loop on a fixed 'model' (its own generator, not the sampling noise)."""
    sched.set_timesteps(steps)
    gm = gen(0)
    x = torch.randn(shape, generator=gm)
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = 0.5 * torch.tanh(xin) + 0.1 * torch.randn(shape, generator=gm)
        x = sched.step(m, t, x, generator=g, **kw).prev_sample
    return x


def pair(name):
    cls, cfg, kw, steps = STOCHASTIC[name]
    stock = cls._dk_stock(**cfg)
    return stock, cls.from_config(stock.config), kw, steps


@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_whole_loop_equals_stock_for_the_same_seed(name, kind):
    stock, fused, kw, steps = pair(name)
    assert fused.noise_mode == "stock"
    torch.manual_seed(123)
    g = generators(kind)
    a = run_loop(stock, steps, kw, g)
    after_stock = gen_state(g)
    torch.manual_seed(123)
    g = generators(kind)
    b = run_loop(fused, steps, kw, g)
    # the generators (or the global RNG) end where stock leaves them: the same draws
    assert torch.equal(gen_state(g), after_stock)
    if name == "flow_stochastic":
        # x0 = x - sigma v, then (1 - sigma') x0 + sigma' z: the fused op is stock's arithmetic
        assert torch.equal(a, b)
    else:
        assert max_rel_err(b, a) <= TOL


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_noise_is_stocks_randn_tensor_call(name, monkeypatch):
    """The fused step calls the randn_tensor of stock's module (looked up at call time, so
    patching it reaches both) with stock's arguments, as many times as stock."""
    stock, fused, kw, steps = pair(name)
    mod = sys.modules[type(fused)._dk_stock.__module__]
    real = mod.randn_tensor
    calls = []

    def spy(shape, generator=None, device=None, dtype=None, **k):
        calls.append((tuple(shape), id(generator), torch.device(device), dtype))
        return real(shape, generator=generator, device=device, dtype=dtype, **k)

    monkeypatch.setattr(mod, "randn_tensor", spy)
    g = generators("one")
    run_loop(stock, steps, kw, g)
    stock_calls, calls[:] = list(calls), []
    run_loop(fused, steps, kw, g)
    assert calls == stock_calls and len(calls) >= steps - 1


def test_noise_options_stay_out_of_the_config(tmp_path):
    stock = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    fused = FusedDDPMScheduler.from_config(stock.config, dk_noise="keyed", dk_seeds=torch.tensor([3, 4]))
    assert fused.noise_mode == "keyed"
    assert "dk_noise" not in fused.config and "dk_seeds" not in fused.config
    assert json.loads(fused.to_json_string()) == json.loads(stock.to_json_string())
    direct = FusedDDPMScheduler(beta_schedule="squaredcos_cap_v2", dk_noise="kernel")
    assert direct.noise_mode == "kernel" and "dk_noise" not in direct.config
    direct.save_config(tmp_path)
    back = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(stock.config)
    assert FusedDDPMScheduler.from_pretrained(tmp_path, dk_noise="kernel").noise_mode == "kernel"
    assert FusedDDPMScheduler.from_pretrained(tmp_path).noise_mode == "stock"
    with pytest.raises(ValueError, match="dk_noise"):
        FusedDDPMScheduler(dk_noise="philox")
    with pytest.raises(ValueError, match="dk_seeds"):
        FusedDDPMScheduler(dk_noise="keyed")
    with pytest.raises(ValueError, match="dk_seeds"):
        FusedDDPMScheduler(dk_seeds=3)


def _refuse_stock_randn(monkeypatch, fused):
    def refuse(*a, **k):
        raise AssertionError("stock's randn_tensor called in an opt-in noise mode")

    monkeypatch.setattr(sys.modules[type(fused)._dk_stock.__module__], "randn_tensor", refuse)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_kernel_noise_is_opt_in_and_seeded(name, monkeypatch):
    """dk_noise="kernel": no randn pass; the same seed gives the same loop, another seed
    another one, and stock's image is not claimed."""
    stock, default, kw, steps = pair(name)
    fused = type(default).from_config(stock.config, dk_noise="kernel")
    _refuse_stock_randn(monkeypatch, fused)
    a = run_loop(copy.deepcopy(fused), steps, kw, gen(1))
    b = run_loop(copy.deepcopy(fused), steps, kw, gen(1))
    c = run_loop(copy.deepcopy(fused), steps, kw, gen(2))
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_keyed_noise_is_batch_invariant(name, monkeypatch):
    """dk_noise="keyed": sample b of a batch is the loop of its seed alone (the model here
    is per-sample, so only the noise could couple the samples); the generator is ignored."""
    stock, default, kw, steps = pair(name)
    cls = type(default)
    seeds = torch.tensor([11, 22, 33], dtype=torch.int64)
    _refuse_stock_randn(monkeypatch, default)
    shape = (3,) + SHAPE[1:]
    whole = run_loop(cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds), steps, kw, gen(1), shape)
    for b in (0, 2):
        one = cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds[b:b + 1])
        got = _loop_sample(one, steps, kw, shape, b)
        assert torch.equal(got, whole[b:b + 1])
    other = run_loop(cls.from_config(stock.config, dk_noise="keyed", dk_seeds=seeds + 1), steps, kw, None, shape)
    assert not torch.equal(other, whole)


def _loop_sample(sched, steps, kw, shape, b):
    """run_loop's sample ``b`` alone: the same model stream (drawn for the whole batch)."""
    sched.set_timesteps(steps)
    gm = gen(0)
    x = torch.randn(shape, generator=gm)[b:b + 1]
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = 0.5 * torch.tanh(xin) + 0.1 * torch.randn(shape, generator=gm)[b:b + 1]
        x = sched.step(m, t, x, **kw).prev_sample
    return x


def test_ddpm_final_step_draws_nothing():
    """Stock draws no noise at t = 0; neither does the fused step (a generator, or the
    global RNG, is left as it was)."""
    s = FusedDDPMScheduler()
    s.set_timesteps(10)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    g = gen(3)
    before = g.get_state()
    s.step(m, s.timesteps[-1], x, generator=g)
    assert torch.equal(g.get_state(), before)
    before = torch.get_rng_state()
    out = s.step(m, s.timesteps[-1], x)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(out.prev_sample, out.pred_original_sample)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_small_log"])
@pytest.mark.parametrize("kind", ["one", "global"])
def test_ddpm_variance_types_equal_stock(variance_type, kind):
    """DDPM's learned variances (the model's second half of channels): the fused step adds
    std_learned * z as stock does, for the same seed. Measured <= 3e-7 relative."""
    stock = diffusers.DDPMScheduler(variance_type=variance_type)
    fused = FusedDDPMScheduler.from_config(stock.config)
    outs = []
    for s in (stock, fused):
        torch.manual_seed(7)
        s.set_timesteps(10)
        g, gm = generators(kind), gen(0)
        x = torch.randn(SHAPE, generator=gm)
        for t in s.timesteps:
            m = 0.5 * torch.tanh(x)
            if variance_type == "learned":  # a variance, around stock's fixed ones
                m = torch.cat([m, 0.05 * torch.rand(SHAPE, generator=gm)], 1)
            elif variance_type == "learned_range":  # an interpolation weight in [-1, 1]
                m = torch.cat([m, 2 * torch.rand(SHAPE, generator=gm) - 1], 1)
            x = s.step(m, t, x, generator=g).prev_sample
        outs.append(x)
    assert max_rel_err(outs[1], outs[0]) <= TOL
    if variance_type != "fixed_small_log":
        with pytest.raises(ValueError, match="twice"):
            fused.step(torch.randn(SHAPE), fused.timesteps[0], torch.randn(SHAPE))
