"""The native kernels on broadcast levels (per frame, per token, mixed, shared over the
batch) against the float64 reference (diffkern.reference): 1e-13 in float64, and float32
within its own rounding, on odd sizes, strided and channels_last_3d views, with given and
drawn noise, and through autograd. The layouts themselves (errors, per-element meaning)
are tests/test_broadcast_levels.py's."""

from __future__ import annotations

import zlib

import pytest
import torch

import diffkern as dk
from diffkern import reference as R

pytestmark = pytest.mark.skipif(not dk.native_available(), reason="needs the built extension")

B, C, F, H, W = 3, 2, 5, 3, 7  # odd sizes: runs of H*W = 21 elements, units straddle them
N, D = 11, 5  # per-token: (B, N tokens, D channels)


def _seed(*names) -> int:
    return zlib.crc32(" ".join(names).encode())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _layouts():
    """name -> (x shape, {level name: level shape})"""
    frame, tok = (B, 1, F, 1, 1), (B, N, 1)
    return {
        "per frame": ((B, C, F, H, W), frame, frame),
        "per token": ((B, N, D), tok, tok),
        "sample and frame": ((B, C, F, H, W), (B,), frame),
        "frame shared by the batch": ((B, C, F, H, W), (1, 1, F, 1, 1), (B,)),
        "token shared by the batch": ((B, N, D), (N, 1), (N, 1)),
        "per channel and frame": ((B, C, F, H, W), (C, F, 1, 1), (B, 1, F, 1, 1)),
    }


LAYOUTS = _layouts()


def _levels(layout, g, flow=False):
    xs, sa, sb = LAYOUTS[layout]
    s = (0.3 if flow else 1.0) + (0.5 if flow else 4.0) * torch.rand(sa, generator=g, dtype=torch.float64)
    frac = 0.2 + 0.6 * torch.rand(sb, generator=g, dtype=torch.float64)
    # sigma_next < sigma elementwise: the smallest sigma scaled by frac
    sn = frac * s.min()
    sp = (s.max() * (1.2 + torch.rand(sb, generator=g, dtype=torch.float64)))
    return xs, s, sn, sp


def _inputs(xs, dtype, g, layout_kind="contiguous"):
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    m = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    if layout_kind == "channels_last" and len(xs) == 5:
        x, m, z = (v.contiguous(memory_format=torch.channels_last_3d) for v in (x, m, z))
    elif layout_kind == "strided":
        x, m, z = (torch.cat([v, v], dim=-1)[..., ::2] for v in (x, m, z))
    return x, m, z


def _check(got, want, dtype):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        else:  # both round the same float32 math; allow a few ulps of the result
            torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5)


def _ops():
    """name -> fn(module, x, m, z, s, sn, sp), module dk (native) or R (reference)."""
    return {
        "euler": lambda M, x, m, z, s, sn, sp: M.euler_step(x, m, s, sn),
        "euler eps": lambda M, x, m, z, s, sn, sp: M.euler_step(x, m, s, sn, prediction_type="epsilon"),
        "euler ancestral": lambda M, x, m, z, s, sn, sp: M.euler_step(x, m, s, sn, eta=1.0, noise=z),
        "euler ancestral drawn": lambda M, x, m, z, s, sn, sp: M.euler_step(x, m, s, sn, eta=0.7,
                                                                             generator=_gen(3)),
        "euler churn v": lambda M, x, m, z, s, sn, sp: M.euler_step(x, m, s, sn, gamma=0.4, noise=z,
                                                                     prediction_type="v_prediction"),
        "heun": lambda M, x, m, z, s, sn, sp: M.heun_step(x, m, z, m * 0.5, s, sn, prediction_type="epsilon"),
        "dpmpp first": lambda M, x, m, z, s, sn, sp: M.dpmpp_2m_step(x, m, None, s, sn, return_denoised=True),
        "dpmpp midpoint": lambda M, x, m, z, s, sn, sp: M.dpmpp_2m_step(x, m, z, s, sn, sp),
        "dpmpp heun vp": lambda M, x, m, z, s, sn, sp: M.dpmpp_2m_step(
            x, m, z, s, sn, sp, solver_type="heun", variance_preserving=True, prediction_type="epsilon",
            return_denoised=True),
    }


def _flow_ops():
    return {
        "flow": lambda M, x, m, z, s, sn: M.flow_step(x, m, s, sn),
        "flow stochastic": lambda M, x, m, z, s, sn: M.flow_step(x, m, s, sn, stochastic=True, noise=z),
        "flow stochastic drawn": lambda M, x, m, z, s, sn: M.flow_step(x, m, s, sn, stochastic=True,
                                                                       generator=_gen(5)),
        "flow_q_sample": lambda M, x, m, z, s, sn: M.flow_q_sample(x, s, z)[0],
    }


KINDS = ["contiguous", "strided", "channels_last"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(_ops()))
def test_sigma_families(op, layout, dtype, kind):
    g = _gen(_seed(op, layout))
    xs, s, sn, sp = _levels(layout, g)
    x, m, z = _inputs(xs, dtype, g, kind)
    f = _ops()[op]
    _check(f(dk, x, m, z, s, sn, sp), f(R, x, m, z, s, sn, sp), dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(_flow_ops()))
def test_flow(op, layout, dtype, kind):
    g = _gen(_seed(op, layout) + 1)
    xs, s, sn, _ = _levels(layout, g, flow=True)
    x, m, z = _inputs(xs, dtype, g, kind)
    f = _flow_ops()[op]
    _check(f(dk, x, m, z, s, sn), f(R, x, m, z, s, sn), dtype)


def _timesteps(layout, g):
    xs, sa, sb = LAYOUTS[layout]
    t = torch.randint(300, 999, sa, generator=g)
    tp = torch.randint(-1, 299, sb, generator=g)  # some -1: final steps, elementwise
    return xs, t, tp


def _t_ops():
    return {
        "q_sample": lambda M, x, m, z, t, tp: M.q_sample(x, t, z)[0],
        "ddim": lambda M, x, m, z, t, tp: M.ddim_step(x, m, t, 0.0, t_prev=tp),
        "ddim eta clip v": lambda M, x, m, z, t, tp: M.ddim_step(x, m, t, 0.6, t_prev=tp, noise=z, clip_sample=1.5,
                                                                 prediction_type="v_prediction"),
        "ddim drawn": lambda M, x, m, z, t, tp: M.ddim_step(x, m, t, 1.0, t_prev=tp, generator=_gen(9)),
        "ddpm": lambda M, x, m, z, t, tp: M.ddpm_step(x, m, t, t_prev=tp, noise=z),
        "ddpm large sample": lambda M, x, m, z, t, tp: M.ddpm_step(x, m, t, t_prev=tp, noise=z, variance="fixed_large",
                                                                   prediction_type="sample"),
        "lcm": lambda M, x, m, z, t, tp: M.lcm_step(x, m, t, tp, noise=z, return_denoised=True),
        "lcm clip drawn": lambda M, x, m, z, t, tp: M.lcm_step(x, m, t, tp, clip_sample=1.0, generator=_gen(2)),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(_t_ops()))
def test_timestep_ops(op, layout, dtype, kind):
    g = _gen(_seed(op, layout) + 2)
    xs, t, tp = _timesteps(layout, g)
    x, m, z = _inputs(xs, dtype, g, kind)
    f = _t_ops()[op]
    _check(f(dk, x, m, z, t, tp), f(R, x, m, z, t, tp), dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_follow_the_levels(layout):
    """The native backward (coefficient tables of the levels' shape, the fused DDIM/LCM
    backward kernels) equals the reference's autograd."""
    g = _gen(7)
    xs, s, sn, sp = _levels(layout, g)
    _, t, tp = _timesteps(layout, g)
    x, m, z = _inputs(xs, torch.float64, g)
    calls = {
        "euler ancestral": lambda M, a, b: M.euler_step(a, b, s, sn, eta=1.0, noise=z),
        "dpmpp": lambda M, a, b: M.dpmpp_2m_step(a, b, z, s, sn, sp, return_denoised=True),
        "flow": lambda M, a, b: M.flow_step(a, b, s * 0.2, sn * 0.2),
        "ddim": lambda M, a, b: M.ddim_step(a, b, t, 0.5, t_prev=tp, noise=z, clip_sample=1.0),
        "lcm clip": lambda M, a, b: M.lcm_step(a, b, t, tp, noise=z, clip_sample=1.0, return_denoised=True),
    }
    w = torch.randn(xs, generator=g, dtype=torch.float64)
    for name, f in calls.items():
        grads = []
        for M in (dk, R):
            a, b = x.clone().requires_grad_(), m.clone().requires_grad_()
            out = f(M, a, b)
            out = out if isinstance(out, tuple) else (out,)
            sum((o * w).sum() for o in out).backward()
            grads.append((a.grad, b.grad))
        for ga, gb in zip(*grads, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_q_sample_gradient_follows_t(layout):
    """q_sample's backward (C++, from t's layout) against the reference's autograd."""
    g = _gen(11)
    xs, t, _ = _timesteps(layout, g)
    x, _, z = _inputs(xs, torch.float64, g)
    w = torch.randn(xs, generator=g, dtype=torch.float64)
    grads = []
    for M in (dk, R):
        a, n = x.clone().requires_grad_(), z.clone().requires_grad_()
        (M.q_sample(a, t, n)[0] * w).sum().backward()
        grads.append((a.grad, n.grad))
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
