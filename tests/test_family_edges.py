"""The sampler-family ops at their edges, native and reference alike: a zero batch, the
promoted dtype of mixed operands, results that never alias an input, and channels_last
kept, as the front-door ops (DDPM/DDIM/q_sample) already do."""

from __future__ import annotations

import pytest
import torch
from conftest import gen, needs_native, randn

import diffkern as dk

R = dk.reference
PATHS = [pytest.param(R, id="reference"), pytest.param(dk, id="native", marks=needs_native)]


def _levels(b, lo, hi, seed):
    """b per-sample levels in (lo, hi), fresh and unequal."""
    return lo + (hi - lo) * torch.rand(b, generator=gen(seed), dtype=torch.float64)


def _calls(b):
    """op -> call(o, x, m, z, **kw) with per-sample levels of batch b (every noisy op given
    its noise, or drawing it when z is None)."""
    s, sn, sp = _levels(b, 1.0, 2.0, 11), _levels(b, 0.2, 0.5, 12), _levels(b, 3.0, 4.0, 13)
    f, fn = _levels(b, 0.5, 0.9, 14), _levels(b, 0.1, 0.4, 15)
    t, tp = torch.arange(700, 700 + b, dtype=torch.long), torch.arange(300, 300 + b, dtype=torch.long)

    def noise(z, g):
        return dict(noise=z) if z is not None else dict(generator=gen(g))

    return {
        "euler": lambda o, x, m, z: o.euler_step(x, m, s, sn, prediction_type="epsilon"),
        "euler_ancestral": lambda o, x, m, z: o.euler_step(x, m, s, sn, eta=1.0, **noise(z, 1)),
        "heun": lambda o, x, m, z: o.heun_step(x, m, x * 0.9, m * 1.1, s, sn, prediction_type="v_prediction"),
        "dpmpp_2m": lambda o, x, m, z: o.dpmpp_2m_step(x, m, m * 0.8, s, sn, sp),
        "flow": lambda o, x, m, z: o.flow_step(x, m, f, fn),
        "flow_stochastic": lambda o, x, m, z: o.flow_step(x, m, f, fn, stochastic=True, **noise(z, 2)),
        "flow_q_sample": lambda o, x, m, z: o.flow_q_sample(x, f, z, **({} if z is not None else
                                                                        dict(generator=gen(3))))[0],
        "lcm": lambda o, x, m, z: o.lcm_step(x, m, t, tp, **noise(z, 4)),
    }


NAMES = list(_calls(1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_batch(path, name):
    """A batch of 0 with (0,) levels gives an empty result of x's shape and dtype, as the
    front-door ops do (it used to raise aminmax()'s "empty dimension")."""
    x = torch.empty(0, 4, 3, 5, dtype=torch.bfloat16)
    for z in (None, torch.empty_like(x)):
        out = _calls(0)[name](path, x, torch.empty_like(x), z)
        assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_channels_last_stays_channels_last(path, name, fmt):
    """Numbers are those of the contiguous call, drawn noise included (it follows the
    logical index), and the layout is x's."""
    shape = (2, 3, 4, 5) if fmt == torch.channels_last else (2, 3, 2, 4, 5)
    x, m, z = (randn(*shape, seed=s).contiguous(memory_format=fmt) for s in (1, 2, 3))
    call = _calls(2)[name]
    for noise in (z, None):
        got = call(path, x, m, noise)
        assert got.is_contiguous(memory_format=fmt) and not got.is_contiguous(), name
        want = call(path, x.contiguous(), m.contiguous(), None if noise is None else noise.contiguous())
        assert torch.equal(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_flow_q_sample_promotes_like_q_sample(path):
    """bf16 x0 with fp32 noise gives fp32 (torch's promotion, as q_sample), with the
    numbers of the call on x0 cast up (exact), and hands back the caller's noise."""
    x0 = randn(3, 4, 5, seed=1).bfloat16()
    z = randn(3, 4, 5, seed=2)
    sigma = _levels(3, 0.1, 0.9, 5)
    xt, noise = path.flow_q_sample(x0, sigma, z)
    assert xt.dtype == torch.float32 == path.q_sample(x0, torch.tensor([3, 400, 999]), z)[0].dtype
    assert noise is z
    assert torch.equal(xt, path.flow_q_sample(x0.float(), sigma, z)[0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_returned_denoised_is_never_the_callers_tensor(path, dtype):
    """With ``prediction_type="sample"`` the denoised sample equals the model output; it
    must still be a tensor of its own, so editing it in place leaves the input alone."""
    x, m = randn(2, 3, 4, seed=1, dtype=dtype), randn(2, 3, 4, seed=2, dtype=dtype)
    kept = m.clone()
    for _, den in (path.dpmpp_2m_step(x, m, None, 1.5, 0.5, prediction_type="sample", return_denoised=True),
                   path.dpmpp_2m_step(x, m, m * 0.5, 1.5, 0.5, 3.0, prediction_type="sample",
                                      return_denoised=True)):
        assert torch.equal(den, m)
        den.add_(1.0)
        assert torch.equal(m, kept)
