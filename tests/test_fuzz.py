"""Property-based tests (hypothesis): on every draw, the native ops equal the reference
fallback (diffkern.ops.fallback) on the same inputs.

Draws: shapes 0-d to 5-d including zero-size and one-element ones; contiguous, transposed,
sliced, expanded (stride 0) and channels_last operands; float16/bfloat16/float32/float64
with mixed model-output dtypes (promotion); per-sample t including 0 and T-1, t_prev
including -1; eta; the three prediction types; clip_sample; given noise or generator
noise (drawn in-kernel vs by the reference's Philox: the same normals).

Tolerances: float64 1e-12 relative to the largest |value| (the same math in the same
order, float64 throughout: a float32 rounding inside would show at ~1e-7); float32 1e-6;
float16/bfloat16 2 ulp of the output (both compute in float32 and round once).

Budget: DIFFKERN_FUZZ_EXAMPLES (default 200) examples per test; about 20 s on a 2-core
CI machine.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_within_ulp, needs_native

import diffkern as dk

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = needs_native
F = dk.ops.fallback
T = 1000
EXAMPLES = int(os.environ.get("DIFFKERN_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COUNT = {"steps": 0, "gmm": 0}


def _run_counted(prop, key: str) -> None:
    """Runs a hypothesis property and checks it ran its whole budget: a property whose draws
    were all rejected, or a settings change that cut the examples, would pass vacuously.
    No draw here is filtered and the space is far larger than the budget, so hypothesis
    runs exactly max_examples."""
    COUNT[key] = 0
    prop()
    assert COUNT[key] >= EXAMPLES, f"{key}: {COUNT[key]} examples ran, {EXAMPLES} asked"


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    if got.numel() == 0:
        return
    if got.dtype in (torch.float16, torch.bfloat16):
        assert_within_ulp(got, ref, 2, what)
        return
    g, r = got.double(), ref.double()
    assert torch.equal(torch.isnan(g), torch.isnan(r)), what
    fin = torch.isfinite(r)
    scale = max(1.0, float(r[fin].abs().max())) if bool(fin.any()) else 1.0
    tol = 1e-12 if got.dtype == torch.float64 else 1e-6
    err = float((g[fin] - r[fin]).abs().max()) if bool(fin.any()) else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


@st.composite
def operand(draw, shape, dtype, seed):
    """A tensor of `shape`: contiguous, transposed, sliced, expanded or channels_last."""
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "channels_last"]))
    n = len(shape)
    if kind == "transposed" and n >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64)
        return base.transpose(-1, -2).to(dtype)
    if kind == "sliced" and n >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g, dtype=torch.float64)
        return base[..., 1::2].to(dtype)
    if kind == "expanded" and n >= 1 and any(s > 1 for s in shape):
        d = next(i for i, s in enumerate(shape) if s > 1)
        small = list(shape)
        small[d] = 1
        return torch.randn(tuple(small), generator=g, dtype=torch.float64).to(dtype).expand(*shape)
    if kind == "channels_last" and n == 4:
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype).contiguous(
            memory_format=torch.channels_last)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


shapes = st.integers(0, 5).flatmap(lambda n: st.lists(st.sampled_from([0, 1, 1, 2, 3, 5]), min_size=n, max_size=n))


@st.composite
def timesteps(draw, batch: int, per_sample_ok: bool):
    special = st.sampled_from([0, 1, T - 1, T - 2, 500])
    value = st.one_of(special, st.integers(0, T - 1))
    if per_sample_ok and draw(st.booleans()):
        t = torch.tensor(draw(st.lists(value, min_size=batch, max_size=batch)), dtype=torch.int64)
        kind = draw(st.sampled_from(["none", "minus1", "below"]))
        if kind == "none":
            return t, None
        if kind == "minus1":
            return t, torch.full_like(t, -1)
        gaps = torch.tensor(draw(st.lists(st.integers(1, 60), min_size=batch, max_size=batch)), dtype=torch.int64)
        return t, (t - gaps).clamp_min(-1)
    t = draw(value)
    kind = draw(st.sampled_from(["none", "minus1", "below"]))
    if kind == "none":
        return t, None
    return t, (-1 if kind == "minus1" else max(t - draw(st.integers(1, 60)), -1))


def test_steps_native_equal_reference():
    _run_counted(_steps_property, "steps")


def test_gmm_chain_native_equal_reference():
    _run_counted(_gmm_property, "gmm")


@SETTINGS
@given(data=st.data())
def _steps_property(data):
    shape = data.draw(shapes, label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    mdtype = data.draw(st.sampled_from([dtype, dtype, torch.float32, torch.float16]), label="model dtype")
    op = data.draw(st.sampled_from(["q_sample", "ddim", "ddpm", "langevin"]), label="op")
    x = data.draw(operand(shape, dtype, 1), label="x")
    m = data.draw(operand(shape, mdtype, 2), label="m")
    batch = shape[0] if shape else 1
    t, tp = data.draw(timesteps(batch, len(shape) >= 1 and batch >= 1), label="t")
    pred = data.draw(st.sampled_from(["epsilon", "sample", "v_prediction"]), label="prediction")
    clip = data.draw(st.sampled_from([None, None, 0.5, 1.0, 3.0]), label="clip")
    use_noise = data.draw(st.booleans(), label="noise given")
    z = data.draw(operand(shape, dtype, 3), label="z") if use_noise else None
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")

    def g():
        return None if use_noise else torch.Generator().manual_seed(seed)

    if op == "q_sample":
        got, ref = dk.q_sample(x, t, z, generator=g()), F.q_sample(x, t, z, generator=g())
        _close(got[0], ref[0], "q_sample x_t")
        _close(got[1], ref[1], "q_sample noise")
    elif op == "ddim":
        eta = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="eta")
        kw = dict(t_prev=tp, prediction_type=pred, clip_sample=clip, noise=z)
        _close(dk.ddim_step(x, m, t, eta, generator=g(), **kw), F.ddim_step(x, m, t, eta, generator=g(), **kw),
               "ddim")
    elif op == "ddpm":
        var = data.draw(st.sampled_from(["fixed_small", "fixed_large"]), label="variance")
        kw = dict(t_prev=tp, prediction_type=pred, clip_sample=clip, noise=z, variance=var)
        _close(dk.ddpm_step(x, m, t, generator=g(), **kw), F.ddpm_step(x, m, t, generator=g(), **kw), "ddpm")
    else:
        step = data.draw(st.sampled_from([0.0, 1e-4, 0.05]), label="step_size")
        _close(dk.langevin_step(x, m, step, noise=z, generator=g()),
               F.langevin_step(x, m, step, noise=z, generator=g()), "langevin")
    COUNT["steps"] += 1


@SETTINGS
@given(data=st.data())
def _gmm_property(data):
    n = data.draw(st.integers(0, 9), label="points")
    D = data.draw(st.integers(1, 4), label="D")
    K = data.draw(st.integers(1, 5), label="K")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6), label="seed"))
    x = torch.randn(n, D, generator=gen, dtype=torch.float64) * 3
    zeros = data.draw(st.integers(0, K - 1), label="leading zero weights")
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    w[:zeros] = 0
    w = w / w.sum()
    mu = torch.randn(K, D, generator=gen, dtype=torch.float64) * 3
    sd = torch.rand(K, D, generator=gen, dtype=torch.float64) + 0.3
    if data.draw(st.booleans(), label="isotropic"):
        sd = sd[:, 0]
    levels = data.draw(st.integers(1, 3), label="levels")
    sigmas = [2.0 / (1.7**i) for i in range(levels)]
    kw = dict(n_steps_each=data.draw(st.integers(1, 3), label="steps"), step_lr=0.05,
              denoise=data.draw(st.booleans(), label="denoise"))
    s = data.draw(st.integers(0, 1000), label="noise seed")
    got = dk.gmm_annealed_langevin(x, w, mu, sd, sigmas, generator=torch.Generator().manual_seed(s), **kw)
    ref = F.gmm_annealed_langevin(x, w, mu, sd, sigmas, generator=torch.Generator().manual_seed(s), **kw)
    assert torch.isfinite(got).all()
    # float64 chain; the exp of the two differs by an ulp, carried through a few steps
    _close(got, ref, "gmm") if n == 0 else torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    COUNT["gmm"] += 1
