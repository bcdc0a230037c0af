"""Noise levels and timesteps as broadcast operands (issue 20, item 2).

``sigma``/``sigma_next``/``sigma_prev`` and ``t``/``t_prev`` may be, besides a number, a
0-d tensor or a (B,) per-sample tensor, a tensor with 2 <= ndim <= x.ndim that broadcasts
to x's shape torch-style: per frame (B, 1, F, 1, 1) of a video latent, per token (B, N, 1),
(N, 1) shared by the batch, or two layouts mixed ((B,) beside (B, 1, F, 1, 1), where the
(B,) one is aligned with x's first dim, not torch-style with its last).

The oracle is the op itself called with scalar levels: for each distinct group of elements
(a (b, frame) or (b, token) slice, ...) the op runs on that slice of every x-shaped operand
with Python-number levels, and the broadcast call must agree with it to 1e-13 relative in
float64. The tests call the public ops, so they hold whichever path runs (the reference
with DIFFKERN_DISABLE_NATIVE=1, the native kernels otherwise).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import gen, max_rel_err, randn

import diffkern as dk
from diffkern import _validate as V

F64 = torch.float64
B, C, F, H, W = 3, 3, 5, 3, 1  # video latent (B, C, F, H, W)
N, CT = 7, 5                   # tokens (B, N, CT)


def _u(shape, lo, hi, seed):
    """Uniform float64 in [lo, hi), never an endpoint that a rule refuses."""
    return lo + (hi - lo) * torch.rand(shape, generator=gen(seed), dtype=F64)


def _al(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """v in the layout the ops give it against an x of ``ndim`` dims (the rule under test,
    written out: (B,) on x's first dim, N-D right-aligned)."""
    if v.dim() <= 1:
        return v.reshape(v.numel(), *([1] * (ndim - 1)))
    return v.reshape((1,) * (ndim - v.dim()) + tuple(v.shape))


class Layout:
    """x's shape and the shapes of the first level (sigma, t) and of the second one
    (sigma_next, sigma_prev, t_prev)."""

    def __init__(self, name, x_shape, a_shape, b_shape):
        self.name, self.x_shape, self.a_shape, self.b_shape = name, x_shape, a_shape, b_shape

    def second(self, a: torch.Tensor, u: torch.Tensor, f) -> torch.Tensor:
        """f(a, u) elementwise over the aligned layouts, in b_shape (whose grid holds a's)."""
        nd = len(self.x_shape)
        return f(_al(a, nd), _al(u, nd)).reshape(self.b_shape)


LAYOUTS = [
    Layout("per-frame", (B, C, F, H, W), (B, 1, F, 1, 1), (B, 1, F, 1, 1)),
    Layout("per-token", (B, N, CT), (B, N, 1), (B, N, 1)),
    Layout("mixed-batch-and-frame", (B, C, F, H, W), (B,), (B, 1, F, 1, 1)),
    Layout("token-shared-by-batch", (B, N, CT), (N, 1), (N, 1)),
]


def _ve_levels(lay: Layout, seed: int, final: bool = False) -> dict:
    """sigma > 0, sigma_next < sigma (0 in places with ``final``), sigma_prev > sigma."""
    s = _u(lay.a_shape, 1.5, 3.0, seed)
    sn = lay.second(s, _u(lay.b_shape, 0.3, 0.9, seed + 1), torch.mul)
    if final:
        sn = torch.where(_u(lay.b_shape, 0, 1, seed + 2) < 0.35, torch.zeros_like(sn), sn)
    sp = lay.second(s, _u(lay.b_shape, 1.1, 1.6, seed + 3), torch.mul)
    return {"sigma": s, "sigma_next": sn, "sigma_prev": sp}


def _flow_levels(lay: Layout, seed: int) -> dict:
    s = _u(lay.a_shape, 0.4, 0.95, seed)
    return {"sigma": s, "sigma_next": lay.second(s, _u(lay.b_shape, 0.2, 0.9, seed + 1), torch.mul)}


def _t_levels(lay: Layout, seed: int, *, zeros: bool = False, final: bool = False) -> dict:
    """t in [150, 1000) (0 in places with ``zeros``), t_prev in [t - 140, t - 1] (-1 in
    places with ``final``)."""
    g = gen(seed)
    t = torch.randint(150, 1000, lay.a_shape, generator=g)
    if zeros:
        t = torch.where(torch.rand(lay.a_shape, generator=g) < 0.3, torch.zeros_like(t), t)
    tp = lay.second(t, torch.randint(1, 141, lay.b_shape, generator=g), torch.sub)
    if final:
        tp = torch.where(torch.rand(lay.b_shape, generator=g) < 0.3, torch.full_like(tp, -1), tp)
    return {"t": t, "t_prev": tp}


# (id, level maker, op(o, ops operands, levels) -> tensor or tuple)
OPS = [
    ("euler", _ve_levels, lambda o, a, L: o.euler_step(a.x, a.m, L["sigma"], L["sigma_next"])),
    ("euler-eps", lambda lay, s: _ve_levels(lay, s, final=True),
     lambda o, a, L: o.euler_step(a.x, a.m, L["sigma"], L["sigma_next"], prediction_type="epsilon")),
    ("euler-v", _ve_levels,
     lambda o, a, L: o.euler_step(a.x, a.m, L["sigma"], L["sigma_next"], prediction_type="v_prediction")),
    ("euler-ancestral", lambda lay, s: _ve_levels(lay, s, final=True),
     lambda o, a, L: o.euler_step(a.x, a.m, L["sigma"], L["sigma_next"], eta=1.0, s_noise=0.7, noise=a.z,
                                  prediction_type="epsilon")),
    ("euler-churn", _ve_levels,
     lambda o, a, L: o.euler_step(a.x, a.m, L["sigma"], L["sigma_next"], gamma=0.3, noise=a.z,
                                  prediction_type="v_prediction")),
    ("heun", _ve_levels,
     lambda o, a, L: o.heun_step(a.x, a.m, a.xp, a.m2, L["sigma"], L["sigma_next"], prediction_type="epsilon")),
    ("dpm-first", lambda lay, s: _ve_levels(lay, s, final=True),
     lambda o, a, L: o.dpmpp_2m_step(a.x, a.m, None, L["sigma"], L["sigma_next"], prediction_type="epsilon")),
    ("dpm-midpoint", _ve_levels,
     lambda o, a, L: o.dpmpp_2m_step(a.x, a.m, a.old, L["sigma"], L["sigma_next"], L["sigma_prev"])),
    ("dpm-heun-vp", _ve_levels,
     lambda o, a, L: o.dpmpp_2m_step(a.x, a.m, a.old, L["sigma"], L["sigma_next"], L["sigma_prev"],
                                     prediction_type="epsilon", solver_type="heun", variance_preserving=True)),
    ("dpm-midpoint-vp-denoised", _ve_levels,
     lambda o, a, L: o.dpmpp_2m_step(a.x, a.m, a.old, L["sigma"], L["sigma_next"], L["sigma_prev"],
                                     prediction_type="v_prediction", variance_preserving=True,
                                     return_denoised=True)),
    ("dpm-first-vp-final", lambda lay, s: _ve_levels(lay, s, final=True),
     lambda o, a, L: o.dpmpp_2m_step(a.x, a.m, None, L["sigma"], L["sigma_next"], variance_preserving=True)),
    ("flow", _flow_levels, lambda o, a, L: o.flow_step(a.x, a.m, L["sigma"], L["sigma_next"])),
    ("flow-stochastic", _flow_levels,
     lambda o, a, L: o.flow_step(a.x, a.m, L["sigma"], L["sigma_next"], stochastic=True, noise=a.z)),
    ("flow-q-sample", _flow_levels, lambda o, a, L: o.flow_q_sample(a.x, L["sigma"], a.z)[0]),
    ("lcm", lambda lay, s: _t_levels(lay, s, final=True),
     lambda o, a, L: o.lcm_step(a.x, a.m, L["t"], L["t_prev"], noise=a.z, return_denoised=True)),
    ("lcm-v-clip", _t_levels,
     lambda o, a, L: o.lcm_step(a.x, a.m, L["t"], L["t_prev"], prediction_type="v_prediction", clip_sample=0.8,
                                noise=a.z)),
    ("q-sample", _t_levels, lambda o, a, L: o.q_sample(a.x, L["t"], a.z)[0]),
    ("ddim", lambda lay, s: _t_levels(lay, s, final=True),
     lambda o, a, L: o.ddim_step(a.x, a.m, L["t"], t_prev=L["t_prev"])),
    ("ddim-eta1-clip", _t_levels,
     lambda o, a, L: o.ddim_step(a.x, a.m, L["t"], 1.0, t_prev=L["t_prev"], clip_sample=1.0, noise=a.z)),
    ("ddim-sample-default-prev", lambda lay, s: _t_levels(lay, s, zeros=True),
     lambda o, a, L: o.ddim_step(a.x, a.m, L["t"], prediction_type="sample")),
    ("ddpm-default-prev", lambda lay, s: _t_levels(lay, s, zeros=True),
     lambda o, a, L: o.ddpm_step(a.x, a.m, L["t"], noise=a.z)),
    ("ddpm-large-v", lambda lay, s: _t_levels(lay, s, final=True),
     lambda o, a, L: o.ddpm_step(a.x, a.m, L["t"], t_prev=L["t_prev"], variance="fixed_large",
                                 prediction_type="v_prediction", noise=a.z)),
]


class Operands:
    """The x-shaped operands of every op (float64, random, never zeros)."""

    NAMES = ("x", "m", "m2", "xp", "old", "z")

    def __init__(self, shape=None, seed=0, **given):
        for i, name in enumerate(self.NAMES):
            setattr(self, name, given[name] if shape is None else randn(*shape, dtype=F64, seed=seed + i))

    def sliced(self, idx) -> Operands:
        return Operands(**{n: getattr(self, n)[idx] for n in self.NAMES})


def _groups(x_shape, levels: dict):
    """(slice of x, {name: Python number}) for each distinct element group of the levels'
    joint grid: a dim where some level varies is taken one index at a time, every other
    dim whole."""
    nd = len(x_shape)
    al = {k: _al(v, nd) for k, v in levels.items()}
    grid = torch.broadcast_shapes(*(v.shape for v in al.values()))
    for pos in itertools.product(*(range(n) for n in grid)):
        idx = tuple(slice(p, p + 1) if n > 1 else slice(None) for p, n in zip(pos, grid, strict=True))
        at = tuple(p if n > 1 else 0 for p, n in zip(pos, grid, strict=True))
        yield idx, {k: v.expand(grid)[at].item() for k, v in al.items()}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("name,make,op", OPS, ids=[o[0] for o in OPS])
def test_broadcast_levels_equal_the_op_per_element_group(name, make, op, lay):
    ops = Operands(lay.x_shape, seed=100)
    levels = make(lay, 7)
    out = _as_tuple(op(dk, ops, levels))
    for o in out:
        assert o.shape == lay.x_shape and o.dtype == F64
    n_groups = 0
    for idx, scalars in _groups(lay.x_shape, levels):
        ref = _as_tuple(op(dk, ops.sliced(idx), scalars))
        for o, r in zip(out, ref, strict=True):
            assert max_rel_err(o[idx], r) <= 1e-13, (idx, scalars)
        n_groups += 1
    assert n_groups > 1


@pytest.mark.parametrize("name,make,op", [o for o in OPS if o[0] in ("euler-ancestral", "dpm-heun-vp", "lcm",
                                                                       "ddpm-large-v", "flow-q-sample")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_broadcast_levels_keep_x_layout_and_dtype(name, make, op):
    """float32 channels_last_3d x with float64 per-frame levels: the levels do not promote
    the result, and its layout is x's."""
    lay = LAYOUTS[0]
    ops = Operands(lay.x_shape, seed=200)
    for n in Operands.NAMES:
        setattr(ops, n, getattr(ops, n).float().contiguous(memory_format=torch.channels_last_3d))
    for o in _as_tuple(op(dk, ops, make(lay, 11))):
        assert o.dtype == torch.float32 and o.shape == lay.x_shape
        assert o.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_per_sample_level_aligns_with_the_first_dim_not_the_last():
    """A (B,) sigma on x (B, ..., B) is per sample; the same values as (1, B) (torch
    broadcasting) are per column. The two differ, each as documented."""
    x, m = randn(3, 3, dtype=F64, seed=300), randn(3, 3, dtype=F64, seed=301)
    s = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    per_sample = dk.flow_step(x, m, s, 0.5)
    per_column = dk.flow_step(x, m, s[None], 0.5)
    for b in range(3):
        assert max_rel_err(per_sample[b], x[b] + (0.5 - s[b].item()) * m[b]) <= 1e-15
        assert max_rel_err(per_column[:, b], x[:, b] + (0.5 - s[b].item()) * m[:, b]) <= 1e-15


# ---- the validated forms (what the native ops receive from the Python side) -------------
def test_normal_forms():
    x = randn(B, C, F, H, W, dtype=F64, seed=400)
    pf = _u((B, 1, F, 1, 1), 1, 2, 1).transpose(0, 2).contiguous().transpose(0, 2)  # not contiguous
    assert not pf.is_contiguous()
    got = V.check_noise_level(pf, x, "sigma")
    assert got.shape == pf.shape and got.is_contiguous() and torch.equal(got, pf)
    assert V.check_noise_level(torch.tensor([2.0], dtype=F64), x, "sigma") == 2.0
    assert V.check_noise_level(torch.full((1, 1, 1), 2.0, dtype=F64), x, "sigma") == 2.0  # one element: a float
    assert V.check_noise_level(torch.ones(B, dtype=F64, requires_grad=True), x, "sigma").shape == (B,)
    assert V.check_noise_level(torch.ones((), dtype=F64, requires_grad=True), x, "sigma").shape == (1,)
    assert V.level_shape(torch.ones(B), x, "t") == (B, 1, 1, 1, 1)
    assert V.level_shape(torch.ones(()), x, "t") == (1, 1, 1, 1, 1)
    assert V.level_shape(torch.ones(F, 1, 1), x, "t") == (1, 1, F, 1, 1)
    tt = torch.arange(B * F, dtype=torch.int32).reshape(B, 1, F, 1, 1)
    got = V.check_timesteps(tt, x, 1000)
    assert got.dtype == torch.int64 and got.shape == tt.shape and got.is_contiguous() and torch.equal(got, tt.long())
    assert V.check_timesteps(torch.tensor(5), x, 1000).shape == (1,)
    assert V.check_timesteps(torch.tensor([5, 6, 7]).expand(B), x, 1000).shape == (B,)
    got = V.check_t_prev(torch.full((B, 1, F, 1, 1), -4), V.check_timesteps(3, x, 1000), x, 1000)
    assert got.shape == (B, 1, F, 1, 1) and int(got.min()) == -1  # negative t_prev: -1, the final step


def test_level_order_is_checked_in_aligned_layouts():
    x = randn(B, C, F, H, W, dtype=F64, seed=401)
    s = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    ok = s.reshape(B, 1, 1, 1, 1) * _u((B, 1, F, 1, 1), 0.2, 0.9, 2)  # below s per sample
    V.check_level_order(ok, s, x, "never raised")
    V.check_level_order(torch.full((B, 1, F, 1, 1), 5.0, device="meta"), s, x, "device values are never read")


# ---- bad inputs --------------------------------------------------------------------------
X5 = randn(B, C, F, H, W, dtype=F64, seed=500)
X3 = randn(B, N, CT, dtype=F64, seed=501)
PF = _u((B, 1, F, 1, 1), 1.0, 2.0, 502)
TF = torch.randint(200, 900, (B, 1, F, 1, 1), generator=gen(503))
_BROADCAST = r"of shape \(.*\) does not broadcast to x's shape \(3, 3, 5, 3, 1\)"


def _poke(v: torch.Tensor, value) -> torch.Tensor:
    v = v.clone()
    v[1, 0, 3, 0, 0] = value
    return v


BAD = [
    ("sigma-dim-mismatch", lambda: dk.euler_step(X5, X5, _u((B, 2, F, 1, 1), 1, 2, 1), 0.5), ValueError,
     r"^sigma " + _BROADCAST),
    ("sigma-too-many-dims", lambda: dk.euler_step(X5, X5, _u((1, B, 1, F, 1, 1), 1, 2, 1), 0.5), ValueError,
     r"^sigma of shape \(1, 3, 1, 5, 1, 1\) does not broadcast to x's shape \(3, 3, 5, 3, 1\)$"),
    ("sigma-next-dim-mismatch-flow", lambda: dk.flow_step(X3, X3, 0.5, _u((B, 2, 1), 0, 0.4, 1)), ValueError,
     r"^sigma_next of shape \(3, 2, 1\) does not broadcast to x's shape \(3, 7, 5\)$"),
    ("sigma-2d-on-1d-x", lambda: dk.flow_step(X3[:, 0, 0], X3[:, 0, 0], _u((B, 1), 0, 1, 1), 0.2), ValueError,
     r"^sigma of shape \(3, 1\) does not broadcast to x's shape \(3,\)$"),
    ("sigma-1d-length", lambda: dk.euler_step(X5, X5, _u((F,), 1, 2, 1), 0.5), ValueError,
     r"^sigma has 5 entries but x has batch size 3$"),
    ("sigma-int", lambda: dk.euler_step(X5, X5, torch.ones(B, 1, F, 1, 1, dtype=torch.int64), 0.5), TypeError,
     "sigma must be a floating tensor"),
    ("sigma-nan", lambda: dk.euler_step(X5, X5, _poke(PF, float("nan")), 0.5), ValueError, "sigma must be finite"),
    ("sigma-zero", lambda: dk.euler_step(X5, X5, _poke(PF, 0.0), 0.5), ValueError, r"sigma must be > 0"),
    ("sigma-next-negative", lambda: dk.euler_step(X5, X5, 2.0, _poke(PF, -0.5)), ValueError,
     r"sigma_next must be >= 0"),
    ("flow-q-sigma-above-one", lambda: dk.flow_q_sample(X5, _poke(PF * 0.4, 1.5)), ValueError,
     r"sigma must be <= 1"),
    ("sigma-device", lambda: dk.euler_step(X5, X5, PF.to("meta"), 0.5), dk.MismatchError, "sigma is on meta"),
    ("ancestral-order", lambda: dk.euler_step(X5, X5, PF, _poke(PF * 0.5, 2.5), eta=1.0), ValueError,
     "sigma_next must be <= sigma"),
    ("ancestral-order-mixed", lambda: dk.euler_step(X5, X5, torch.tensor([1.0, 2.0, 3.0], dtype=F64),
                                                    torch.full((B, 1, F, 1, 1), 1.5, dtype=F64), eta=1.0),
     ValueError, "sigma_next must be <= sigma"),
    ("dpm-sigma-prev-order", lambda: dk.dpmpp_2m_step(X5, X5, X5, PF, PF * 0.5, _poke(PF * 1.5, 1.0)), ValueError,
     "sigma_prev must be > sigma"),
    ("dpm-sigma-next-order", lambda: dk.dpmpp_2m_step(X5, X5, X5, PF, _poke(PF * 0.5, 2.0), PF * 1.5), ValueError,
     "sigma_next must be < sigma"),
    ("t-float", lambda: dk.ddim_step(X5, X5, TF.double()), TypeError, "t must be an integer tensor"),
    ("t-bool", lambda: dk.q_sample(X5, TF > 500), TypeError, "t must be an int or an integer tensor"),
    ("t-dim-mismatch", lambda: dk.ddim_step(X5, X5, torch.randint(1, 999, (B, 2, F, 1, 1))), ValueError,
     r"^t " + _BROADCAST),
    ("t-too-many-dims", lambda: dk.q_sample(X3, torch.randint(1, 999, (1, B, N, 1))), ValueError,
     r"^t of shape \(1, 3, 7, 1\) does not broadcast to x's shape \(3, 7, 5\)$"),
    ("t-1d-length", lambda: dk.ddpm_step(X5, X5, torch.randint(1, 999, (F,))), ValueError,
     r"^t has 5 entries but x has batch size 3$"),
    ("t_prev-dim-mismatch", lambda: dk.ddim_step(X5, X5, TF, t_prev=torch.randint(0, 9, (F, 2, 1))), ValueError,
     r"^t_prev " + _BROADCAST),
    ("t-range", lambda: dk.ddim_step(X5, X5, _poke(TF, 1000)), ValueError,
     r"t has (an entry|entries) outside \[0, 1000\)"),
    ("t-negative", lambda: dk.q_sample(X5, _poke(TF, -3)), ValueError, r"t has (an entry|entries) outside \[0, 1000\)"),
    ("t_prev-range", lambda: dk.lcm_step(X5, X5, TF, _poke(TF - 1, 1000)), ValueError,
     r"t_prev has (an entry|entries) outside \[(0|-1), 1000\)"),
    ("t-device", lambda: dk.ddim_step(X5, X5, TF.to("meta")), ValueError, "t is on meta"),
    ("t_prev-not-below-t", lambda: dk.ddim_step(X5, X5, TF, t_prev=_poke(TF - 5, 950)), ValueError,
     "t_prev must be smaller than t"),
    ("t_prev-not-below-t-lcm", lambda: dk.lcm_step(X5, X5, TF, _poke(TF - 5, 950)), ValueError,
     "t_prev must be smaller than t"),
    ("t_prev-not-below-t-mixed", lambda: dk.ddpm_step(X5, X5, torch.tensor([100, 900, 500]),
                                                      t_prev=torch.full((B, 1, F, 1, 1), 150)), ValueError,
     "t_prev must be smaller than t"),
]


@pytest.mark.parametrize("f,exc,match", [pytest.param(f, e, m, id=i) for i, f, e, m in BAD])
def test_bad_levels(f, exc, match):
    with pytest.raises(exc, match=match):
        f()


def test_bad_order_message_matches_the_scalar_one():
    """The broadcast ordering errors are the scalar ones, word for word (the native check
    then names the offending pair, whose values differ here)."""
    msgs = []
    for t_prev in (500, _poke(TF - 5, 950)):
        with pytest.raises(ValueError) as e:
            dk.ddim_step(X5, X5, 500 if isinstance(t_prev, int) else TF, t_prev=t_prev)
        msgs.append(str(e.value))
    assert msgs[0].split(":")[0] == msgs[1].split(":")[0]


# ---- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", [
    lambda x, m, s: dk.euler_step(x, m, s, s * 0.6, prediction_type="epsilon"),
    lambda x, m, s: dk.flow_step(x, m, s * 0.4, s * 0.1),
], ids=["euler", "flow"])
def test_gradcheck_per_frame_sigma(op):
    x = randn(2, 2, 3, 2, 1, dtype=F64, seed=600).requires_grad_()
    m = randn(2, 2, 3, 2, 1, dtype=F64, seed=601).requires_grad_()
    s = _u((2, 1, 3, 1, 1), 1.0, 2.0, 602)
    assert torch.autograd.gradcheck(lambda x_, m_: op(x_, m_, s), (x, m))
