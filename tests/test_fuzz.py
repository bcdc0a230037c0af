"""Property-based tests (hypothesis): on every draw, the native ops equal the reference
on the same inputs: the DDPM/DDIM/q_sample/Langevin ops against the reference fallback
(diffkern.ops.fallback: _validate.py's checks, then diffkern.reference's math), the
sampler families (euler/heun/dpmpp_2m/flow/flow_q_sample/lcm/linear_step) against
diffkern.reference.<op>.

Noise levels and timesteps are drawn in every layout the ops take (_validate.level_shape):
a Python number, 0-d, (1,), per sample (B,), per frame (B, 1, F, 1, 1) of a 5-D x, per
token (B, N, 1) of a 3-D x, and random broadcastable shapes (ndim 2..x.ndim, each dim 1 or
x's); the two levels of a call in independent layouts, valid elementwise (sigma > 0 where
the op divides, sigma_next <= sigma / < sigma and sigma_prev > sigma where the step needs
it, flow sigmas in [0, 1], t in [0, T), t_prev in [-1, t)), in float16/32/64 (int16/32/64
timesteps).

Draws: shapes 0-d to 5-d including zero-size and one-element ones; contiguous, transposed,
sliced, expanded (stride 0) and channels_last operands; float16/bfloat16/float32/float64
with mixed model-output dtypes (promotion); per-sample t including 0 and T-1, t_prev
including -1; eta; the three prediction types; clip_sample; given noise or generator
noise (drawn in-kernel vs by the reference's Philox: the same normals).

Tolerances: float64 1e-12 relative to the largest |value| (the same math in the same
order, float64 throughout: a float32 rounding inside would show at ~1e-7); float32 1e-6;
float16/bfloat16 2 ulp of the output (both compute in float32 and round once).

Budget: DIFFKERN_FUZZ_EXAMPLES (default 200) examples per test; about 30 s for the whole
file on a 2-core machine.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_within_ulp, needs_native

import diffkern as dk
from diffkern import reference as R

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = needs_native
F = dk.ops.fallback
T = 1000
EXAMPLES = int(os.environ.get("DIFFKERN_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COUNT = {"steps": 0, "gmm": 0, "sigma": 0, "flow": 0, "lcm": 0, "linear": 0}


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
def operand(draw, shape, dtype, seed, broadcast=False):
    """A tensor of `shape`: contiguous, transposed, sliced, expanded or channels_last
    (channels_last_3d for 5-D); with ``broadcast``, also a smaller tensor that broadcasts
    to `shape` (some dims 1, leading dims dropped), as model outputs and noise may be."""
    g = torch.Generator().manual_seed(seed)
    kinds = ["contiguous", "transposed", "sliced", "expanded", "channels_last"] + (["broadcast"] if broadcast else [])
    kind = draw(st.sampled_from(kinds))
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
    if kind == "channels_last" and n in (4, 5):
        fmt = torch.channels_last if n == 4 else torch.channels_last_3d
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    if kind == "broadcast" and n >= 1:
        k = draw(st.integers(0, n), label="broadcast ndim")
        small = tuple(draw(st.sampled_from([1, s])) for s in shape[n - k:])
        return torch.randn(small, generator=g, dtype=torch.float64).to(dtype)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


shapes = st.integers(0, 5).flatmap(lambda n: st.lists(st.sampled_from([0, 1, 1, 2, 3, 5]), min_size=n, max_size=n))


# ---- level layouts ------------------------------------------------------------------------
def _dims(n):
    return st.lists(st.sampled_from([1, 2, 3, 5]), min_size=n, max_size=n).map(tuple)


# the families get per-frame (5-D) and per-token (3-D) x more often than `shapes` gives them
family_shapes = st.one_of(shapes, _dims(5), _dims(3))


@st.composite
def layout(draw, shape):
    """A level's layout against an x of `shape`: None for a Python number, else the
    level tensor's shape: () shared, (1,), (B,) per sample, (B, 1, F, 1, 1) per frame
    (5-D x), (B, N, 1) per token (3-D x), or a random broadcastable shape of 2..x.ndim
    dims, each 1 or x's."""
    nd = len(shape)
    # hypothesis favours the first entries of a sampled_from: the broadcast layouts go first
    kinds = ["per-frame"] if nd == 5 else ["per-token"] if nd == 3 else []
    kinds += (["random"] if nd >= 2 else []) + (["per-sample"] if nd >= 1 else []) + ["one", "0-d", "number"]
    kind = draw(st.sampled_from(kinds), label="layout")
    event(f"layout {kind}")  # pytest --hypothesis-show-statistics: how often each layout ran
    if kind == "number":
        return None
    if kind == "0-d":
        return ()
    if kind == "one":
        return (1,)
    if kind == "per-sample":
        return (shape[0],)
    if kind == "per-frame":
        return (shape[0], 1, shape[2], 1, 1)
    if kind == "per-token":
        return (shape[0], shape[1], 1)
    k = draw(st.integers(2, nd), label="level ndim")
    return tuple(draw(st.sampled_from([1, s]), label="level dim") for s in shape[nd - k:])


def _aligned(lay, shape) -> tuple:
    """The level's shape against x (written out here, not _validate's): (B,) on x's FIRST
    dim, N-D right-aligned."""
    nd = len(shape)
    if lay is None or len(lay) == 0 or (len(lay) == 1 and nd == 0):
        return (1,) * nd
    if len(lay) == 1:
        return (lay[0],) + (1,) * (nd - 1)
    return (1,) * (nd - len(lay)) + tuple(lay)


def _as_level(v: torch.Tensor, lay, dtype):
    """An x-aligned float64/int64 tensor of values -> the level as the op takes it."""
    if lay is None:
        return v.item()
    return v.reshape(lay).to(dtype)


def _toward(a: torch.Tensor, to: tuple, reduce) -> torch.Tensor:
    """a (x-aligned) reduced (amin/amax) over the dims where the layout `to` is 1 and a is
    not, then expanded to `to`: the bound every element of a level in layout `to` meets
    against every element of a that it meets elementwise. Ones where there is nothing to
    meet (a zero-size dim)."""
    dims = [d for d in range(a.dim()) if to[d] == 1 and a.shape[d] != 1]
    if any(a.shape[d] == 0 for d in dims):
        return torch.ones(to, dtype=a.dtype)
    if dims:
        a = reduce(a, dim=dims, keepdim=True)
    return a.expand(to)


def _sprinkle(v, g, p, value):
    """v with a fraction p of its entries set to `value` (edge values: sigma_next 0, t 0)."""
    return torch.where(torch.rand(v.shape, generator=g, dtype=torch.float64) < p, torch.full_like(v, value), v)


LEVEL_DTYPES = [torch.float64, torch.float32, torch.float16]
T_DTYPES = [torch.int64, torch.int32, torch.int16]


@st.composite
def timesteps(draw, shape):
    """(t, t_prev or None) in independent layouts against x's `shape`: t in [0, T) (with
    0, 1, T-1, T-2, 500 sprinkled in), t_prev none, all -1, or below t elementwise by
    1..60 (clamped at -1)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="t seed"))
    la = draw(layout(shape), label="t layout")
    aa = _aligned(la, shape)
    t = torch.randint(0, T, aa, generator=g)
    p = draw(st.sampled_from([0.0, 0.3, 1.0]), label="special t share")
    special = torch.tensor([0, 1, T - 1, T - 2, 500])[torch.randint(0, 5, aa, generator=g)]
    t = torch.where(torch.rand(aa, generator=g) < p, special, t)
    kind = draw(st.sampled_from(["none", "minus1", "below"]), label="t_prev kind")
    t_level = _as_level(t, la, draw(st.sampled_from(T_DTYPES), label="t dtype"))
    if kind == "none":
        return t_level, None
    lb = draw(layout(shape), label="t_prev layout")
    ab = _aligned(lb, shape)
    if kind == "minus1":
        tp = torch.full(ab, -1, dtype=torch.int64)
    else:
        gaps = torch.randint(1, 61, ab, generator=g)
        tp = (_toward(t, ab, torch.amin) - gaps).clamp_min(-1)
    return t_level, _as_level(tp, lb, draw(st.sampled_from(T_DTYPES), label="t_prev dtype"))


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
    m = data.draw(operand(shape, mdtype, 2, broadcast=True), label="m")
    t, tp = data.draw(timesteps(shape), label="t")
    pred = data.draw(st.sampled_from(["epsilon", "sample", "v_prediction"]), label="prediction")
    clip = data.draw(st.sampled_from([None, None, 0.5, 1.0, 3.0]), label="clip")
    use_noise = data.draw(st.booleans(), label="noise given")
    z = data.draw(operand(shape, dtype, 3, broadcast=True), label="z") if use_noise else None
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


# ---- the sampler families --------------------------------------------------------------
def _close_all(got, ref, what):
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        _close(a, b, f"{what}[{i}]")


def _gen_fn(use_noise, seed):
    return lambda: None if use_noise else torch.Generator().manual_seed(seed)


@st.composite
def sigma_levels(draw, shape, lo, hi, *, log=True, label="sigma"):
    """(layout, values x-aligned in float64, generator): with ``log``, a center log-uniform
    in [lo, hi] and entries within a factor 2 of it (a float32 step divides by sigma_next:
    levels a thousandfold apart make both paths' float32 rounding ~1e-5 of the result, an
    ill-conditioned draw, not a difference); else uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
    lay = draw(layout(shape), label=f"{label} layout")
    a = _aligned(lay, shape)
    u = torch.rand(a, generator=g, dtype=torch.float64)
    if log:
        c = lo * (hi / lo) ** draw(st.floats(0, 1), label=f"{label} center")
        return lay, c * 2 ** (2 * u - 1), g
    return lay, lo + (hi - lo) * u, g


def _rounded(v, lay, dtype):
    """The level in its dtype, and its values back in float64 (what the op will see)."""
    lvl = _as_level(v, lay, dtype)
    return lvl, (torch.tensor(lvl, dtype=torch.float64).expand(v.shape) if lay is None else
                 lvl.to(torch.float64).reshape(v.shape))


@st.composite
def second_level(draw, shape, first, *, lo, hi, edges, label, reduce=None):
    """A level in its own layout with values ``f * bound`` elementwise, f in [lo, hi] (plus
    the edge values `edges` sprinkled in), bound the min (hi <= 1) or max (lo >= 1) of
    `first` over the elements it meets (or `reduce`'s)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label=f"{label} seed"))
    lay = draw(layout(shape), label=f"{label} layout")
    a = _aligned(lay, shape)
    f = lo + (hi - lo) * torch.rand(a, generator=g, dtype=torch.float64)
    for e in edges:
        f = _sprinkle(f, g, draw(st.sampled_from([0.0, 0.3]), label=f"{label} edge {e}"), e)
    bound = _toward(first, a, reduce or (torch.amin if hi <= 1 else torch.amax))
    return lay, f * bound


def test_sigma_families_native_equal_reference():
    _run_counted(_sigma_property, "sigma")


def test_flow_native_equal_reference():
    _run_counted(_flow_property, "flow")


def test_lcm_native_equal_reference():
    _run_counted(_lcm_property, "lcm")


def test_linear_step_native_equal_reference():
    _run_counted(_linear_property, "linear")


@SETTINGS
@given(data=st.data())
def _sigma_property(data):
    """euler (plain, ancestral, churn), heun and dpmpp_2m (first order, midpoint, heun,
    variance-preserving) on levels of every layout."""
    shape = data.draw(family_shapes, label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    mdtype = data.draw(st.sampled_from([dtype, dtype, torch.float32, torch.float16]), label="model dtype")
    ldtype = data.draw(st.sampled_from(LEVEL_DTYPES), label="level dtype")
    op = data.draw(st.sampled_from(["dpmpp", "dpmpp_first", "heun", "euler_churn", "euler_ancestral", "euler"]),
                   label="op")
    x = data.draw(operand(shape, dtype, 1), label="x")
    m = data.draw(operand(shape, mdtype, 2, broadcast=True), label="m")
    pred = data.draw(st.sampled_from(["epsilon", "sample", "v_prediction"]), label="prediction")
    lay, s64, _ = data.draw(sigma_levels(shape, 0.02, 40.0), label="sigma")
    sigma, s64 = _rounded(s64, lay, ldtype)
    # sigma_next: below sigma elementwise (0 and == sigma sprinkled in) where the step
    # needs the order, strictly below for the second-order DPM step, free otherwise
    if op in ("euler_ancestral", "dpmpp_first") or (op == "euler" and data.draw(st.booleans(), label="ordered")):
        lay_n, sn64 = data.draw(second_level(shape, s64, lo=0.0, hi=1.0, edges=(0.0, 1.0), label="sigma_next"))
    elif op == "dpmpp":
        lay_n, sn64 = data.draw(second_level(shape, s64, lo=0.0, hi=0.9, edges=(0.0,), label="sigma_next"))
    else:  # either side of sigma (0 in places where the step allows it)
        lay_n, sn64 = data.draw(second_level(shape, s64, lo=0.3, hi=3.0, edges=() if op == "heun" else (0.0,),
                                             label="sigma_next", reduce=torch.amin))
    sigma_next, _ = _rounded(sn64, lay_n, ldtype)
    use_noise = data.draw(st.booleans(), label="noise given")
    z = data.draw(operand(shape, data.draw(st.sampled_from([dtype, torch.float32]), label="noise dtype"), 3,
                          broadcast=True), label="z") if use_noise else None
    g = _gen_fn(use_noise, data.draw(st.integers(0, 2**63 - 1), label="seed"))

    if op.startswith("euler"):
        kw = dict(prediction_type=pred, noise=z, s_noise=data.draw(st.sampled_from([1.0, 0.7, 0.0]), label="s_noise"))
        if op == "euler_ancestral":
            kw["eta"] = data.draw(st.sampled_from([0.3, 1.0]), label="eta")
        elif op == "euler_churn":
            kw["gamma"] = data.draw(st.sampled_from([0.05, 0.4]), label="gamma")
        got = dk.euler_step(x, m, sigma, sigma_next, generator=g(), **kw)
        ref = R.euler_step(x, m, sigma, sigma_next, generator=g(), **kw)
    elif op == "heun":
        xp = data.draw(operand(shape, dtype, 4), label="x_proposal")
        mp = data.draw(operand(shape, mdtype, 5, broadcast=True), label="denoised_proposal")
        got = dk.heun_step(x, m, xp, mp, sigma, sigma_next, prediction_type=pred)
        ref = R.heun_step(x, m, xp, mp, sigma, sigma_next, prediction_type=pred)
    else:
        kw = dict(prediction_type=pred, variance_preserving=data.draw(st.booleans(), label="vp"),
                  return_denoised=data.draw(st.booleans(), label="return_denoised"),
                  solver_type=data.draw(st.sampled_from(["midpoint", "heun"]), label="solver"))
        old, sigma_prev = None, None
        if op == "dpmpp":
            old = data.draw(operand(shape, mdtype, 6, broadcast=True), label="old_denoised")
            lay_p, sp64 = data.draw(second_level(shape, s64, lo=1.1, hi=3.0, edges=(), label="sigma_prev"))
            sigma_prev, _ = _rounded(sp64, lay_p, ldtype)
        got = dk.dpmpp_2m_step(x, m, old, sigma, sigma_next, sigma_prev, **kw)
        ref = R.dpmpp_2m_step(x, m, old, sigma, sigma_next, sigma_prev, **kw)
    _close_all(got, ref, op)
    event(op)
    COUNT["sigma"] += 1


@SETTINGS
@given(data=st.data())
def _flow_property(data):
    """flow_step (deterministic, stochastic) and flow_q_sample, sigmas in [0, 1]."""
    shape = data.draw(family_shapes, label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    ldtype = data.draw(st.sampled_from(LEVEL_DTYPES), label="level dtype")
    op = data.draw(st.sampled_from(["flow_stochastic", "flow_q_sample", "flow_step"]), label="op")
    x = data.draw(operand(shape, dtype, 1), label="x")
    lay, s64, g0 = data.draw(sigma_levels(shape, 0.0, 1.0, log=False), label="sigma")
    s64 = _sprinkle(_sprinkle(s64, g0, data.draw(st.sampled_from([0.0, 0.2]), label="sigma 0"), 0.0), g0,
                    data.draw(st.sampled_from([0.0, 0.2]), label="sigma 1"), 1.0)
    sigma, s64 = _rounded(s64, lay, ldtype)
    use_noise = data.draw(st.booleans(), label="noise given")
    z = data.draw(operand(shape, data.draw(st.sampled_from([dtype, torch.float32]), label="noise dtype"), 3,
                          broadcast=True), label="z") if use_noise else None
    g = _gen_fn(use_noise, data.draw(st.integers(0, 2**63 - 1), label="seed"))
    if op == "flow_q_sample":
        _close_all(dk.flow_q_sample(x, sigma, z, generator=g()), R.flow_q_sample(x, sigma, z, generator=g()), op)
    else:
        if data.draw(st.booleans(), label="sigma_next below"):
            lay_n, sn64 = data.draw(second_level(shape, s64, lo=0.0, hi=1.0, edges=(0.0, 1.0), label="sigma_next"))
        else:
            lay_n, sn64, _ = data.draw(sigma_levels(shape, 0.0, 1.0, log=False, label="sigma_next"),
                                       label="sigma_next")
        sigma_next, _ = _rounded(sn64, lay_n, ldtype)
        v = data.draw(operand(shape, data.draw(st.sampled_from([dtype, torch.float32, torch.float16]),
                                               label="velocity dtype"), 2, broadcast=True), label="velocity")
        kw = dict(stochastic=op == "flow_stochastic", noise=z)
        _close_all(dk.flow_step(x, v, sigma, sigma_next, generator=g(), **kw),
                   R.flow_step(x, v, sigma, sigma_next, generator=g(), **kw), op)
    event(op)
    COUNT["flow"] += 1


@SETTINGS
@given(data=st.data())
def _lcm_property(data):
    """lcm_step with t, t_prev in every layout (t_prev -1, the final step, in places)."""
    shape = data.draw(family_shapes, label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    mdtype = data.draw(st.sampled_from([dtype, dtype, torch.float32, torch.float16]), label="model dtype")
    x = data.draw(operand(shape, dtype, 1), label="x")
    m = data.draw(operand(shape, mdtype, 2, broadcast=True), label="m")
    t, tp = data.draw(timesteps(shape), label="t")
    if tp is None:  # lcm_step's t_prev is required
        tp = -1
    use_noise = data.draw(st.booleans(), label="noise given")
    z = data.draw(operand(shape, dtype, 3, broadcast=True), label="z") if use_noise else None
    g = _gen_fn(use_noise, data.draw(st.integers(0, 2**63 - 1), label="seed"))
    kw = dict(prediction_type=data.draw(st.sampled_from(["epsilon", "sample", "v_prediction"]), label="prediction"),
              clip_sample=data.draw(st.sampled_from([None, None, 0.5, 1.0]), label="clip"),
              timestep_scaling=data.draw(st.sampled_from([10.0, 1.0, 0.0]), label="timestep_scaling"),
              sigma_data=data.draw(st.sampled_from([0.5, 1.0]), label="sigma_data"),
              return_denoised=data.draw(st.booleans(), label="return_denoised"), noise=z)
    _close_all(dk.lcm_step(x, m, t, tp, generator=g(), **kw), R.lcm_step(x, m, t, tp, generator=g(), **kw), "lcm")
    COUNT["lcm"] += 1


@SETTINGS
@given(data=st.data())
def _linear_property(data):
    """linear_step: 1-6 inputs, 1-3 outputs, coefficients shared (host rows, (K, J)) or
    per sample ((1|B, K, J)), noise coefficients none / host / (K,) / (1|B, K) with zeros."""
    shape = data.draw(family_shapes, label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    J = data.draw(st.integers(1, 6), label="J")
    K = data.draw(st.integers(1, 3), label="K")
    x = data.draw(operand(shape, dtype, 1), label="x")
    inputs = [x] + [data.draw(operand(shape, data.draw(st.sampled_from([dtype, dtype, torch.float32]),
                                                       label="input dtype"), 10 + j, broadcast=True),
                              label=f"inputs[{j}]") for j in range(1, J)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="coefficient seed"))
    B = shape[0] if shape else 1
    c = torch.randn(K, J, generator=g, dtype=torch.float64)
    ckind = data.draw(st.sampled_from(["host", "KJ", "1KJ", "BKJ"]), label="coeffs layout")
    if ckind == "host":
        coeffs = c.tolist()
    elif ckind == "KJ":
        coeffs = c
    elif ckind == "1KJ":
        coeffs = c[None]
    else:
        coeffs = torch.randn(B, K, J, generator=g, dtype=torch.float64)
    nkind = data.draw(st.sampled_from(["none", "host", "K", "BK"]), label="noise_coeffs layout")
    cn = _sprinkle(torch.rand(B, K, generator=g, dtype=torch.float64), g, 0.3, 0.0)
    c1 = _sprinkle(torch.rand(K, generator=g, dtype=torch.float64), g, 0.3, 0.0)
    noise_coeffs = {"none": None, "host": c1.tolist(), "K": c1, "BK": cn}[nkind]
    use_noise = data.draw(st.booleans(), label="noise given") and noise_coeffs is not None
    z = data.draw(operand(shape, dtype, 3, broadcast=True), label="z") if use_noise else None
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")

    def gen():
        return None if use_noise or noise_coeffs is None else torch.Generator().manual_seed(seed)

    _close_all(dk.linear_step(inputs, coeffs, noise_coeffs=noise_coeffs, noise=z, generator=gen()),
               R.linear_step(inputs, coeffs, noise_coeffs=noise_coeffs, noise=z, generator=gen()), "linear_step")
    COUNT["linear"] += 1
