"""FusedFlowMatchEulerDiscreteScheduler against stock for the schedule options that
test_fused_schedulers.py's FLOW_OPTIONS leaves out (exponential / beta sigmas, custom
timesteps, custom sigmas with dynamic shifting), for stochastic sampling with the
default noise (stock's own draw from the same generator), and for the deterministic
fast path of ``step`` against the general one (issue 22).

Deterministic loops are compared bitwise: the kernel forms ``x + (sigma_next - sigma) v``
with stock's float32 roundings (no contraction into an FMA)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffkern.integrations.diffusers import FusedFlowMatchEulerDiscreteScheduler

SHAPE = (2, 4, 8, 8)
TOL = 1e-5

CASES = [
    (dict(use_exponential_sigmas=True), dict(num_inference_steps=12)),
    (dict(use_beta_sigmas=True), dict(num_inference_steps=12)),
    (dict(shift=3.0), dict(timesteps=[1000.0, 900.0, 750.0, 500.0, 260.0, 90.0])),
    (dict(use_dynamic_shifting=True), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.12], mu=1.1)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1), dict(num_inference_steps=9,
                                                                                          mu=0.7)),
    (dict(invert_sigmas=True, shift=2.0), dict(num_inference_steps=10)),
]


def _ids(case):
    cfg, kw = case
    return "-".join(f"{k}={v if not isinstance(v, list) else len(v)}" for k, v in {**cfg, **kw}.items())


def _loop(sched, set_kw, seed, gen_seed=None, scalar=True):
    sched.set_timesteps(**set_kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    gen = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
    outs = []
    for t in sched.timesteps:
        v = torch.randn(SHAPE, generator=g)
        tt = t if scalar else t.reshape(1)
        kw = {"generator": gen} if gen is not None else {}
        x = sched.step(v, tt, x, **kw).prev_sample
        outs.append(x)
    return outs


def _pair(cfg):
    stock = FlowMatchEulerDiscreteScheduler(**cfg)
    return stock, FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_flow_schedule_options_bitwise(case):
    cfg, set_kw = case
    stock, fused = _pair(cfg)
    a = _loop(stock, set_kw, seed=1)
    b = _loop(fused, set_kw, seed=1)
    assert torch.equal(stock.sigmas, fused.sigmas)
    for i, (u, w) in enumerate(zip(b, a, strict=True)):
        assert torch.equal(u, w), f"step {i}: max abs diff {(u - w).abs().max().item():.3g}"


@pytest.mark.parametrize("case", CASES[:3], ids=[_ids(c) for c in CASES[:3]])
def test_flow_stochastic_same_seed(case):
    """stochastic_sampling with a generator: the fused step draws what stock draws."""
    cfg, set_kw = case
    stock, fused = _pair(dict(cfg, stochastic_sampling=True))
    a = _loop(stock, set_kw, seed=2, gen_seed=7)
    b = _loop(fused, set_kw, seed=2, gen_seed=7)
    for i, (u, w) in enumerate(zip(b, a, strict=True)):
        err = (u - w).abs().max().item()
        assert err <= TOL * max(w.abs().max().item(), 1e-30), f"step {i}: {err:.3g}"


def test_flow_fast_path_equals_general_path():
    """A 0-d timestep after the first step takes the scheduler's fast path (straight to
    the raw flow_step overload, diffkern.unchecked); a (1,) timestep the general one. Both
    must give the same bits, and the fast path must have run on every step but the first."""
    calls = []
    import diffkern.unchecked as U

    real = U._FLOW
    if real is None:
        pytest.skip("no native ops")
    try:
        U._FLOW = lambda *a: calls.append(1) or real(*a)
        a = _loop(FusedFlowMatchEulerDiscreteScheduler(shift=3.0), dict(num_inference_steps=8), seed=3)
        n_fast = len(calls)
        b = _loop(FusedFlowMatchEulerDiscreteScheduler(shift=3.0), dict(num_inference_steps=8), seed=3,
                  scalar=False)
    finally:
        U._FLOW = real
    assert n_fast >= 7  # every step but the first (the first finds its index first)
    for u, w in zip(a, b, strict=True):
        assert torch.equal(u, w)


def test_flow_fast_path_fp16_model_output():
    """Mixed dtypes (fp16 model output, fp32 latents) leave the fast path: stock promotes
    and returns the model output's dtype."""
    stock, fused = _pair(dict(shift=3.0))
    for s in (stock, fused):
        s.set_timesteps(6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g)
    xs, xf = x, x.clone()
    for t in stock.timesteps:
        v = torch.randn(SHAPE, generator=g).half()
        xs = stock.step(v, t, xs).prev_sample
        xf = fused.step(v, t, xf).prev_sample
        assert xf.dtype == xs.dtype == torch.float16
        xs, xf = xs.float(), xf.float()
        assert (xf - xs).abs().max().item() <= 1e-3 * xs.abs().max().item()
