"""Native sampler-family ops (csrc/kernels/<op>.h) against the reference
(diffkern/reference_samplers.py): every op and mode, float64 / float32 / fp16 / bf16,
odd sizes and one element, per-sample (B,) scalars (float32 and float64 tensors, rows
with sigma_next = 0), non-contiguous and broadcast operands, given and drawn noise, the
streaming and staged CPU paths, opcheck, and gradients.

Oracles: float64 -> the reference in float64, max|native - ref| / max|ref| <= 1e-13 (the
two evaluate the same formulas in different orders; float64 allows that much). float32 ->
the reference on float64 upcasts of the same inputs, <= 1e-6. fp16/bf16 -> the reference
on the same half inputs (it computes in float32 and rounds), within 2 ulp of the output
(plus float32's own rounding of the terms, 1e-6 of the largest, for outputs that cancel).
Drawn noise: the rule of tests/test_native_cpu.py (2e-6 absolute at unit scale).
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest
import torch
from conftest import gen, max_rel_err, needs_native, randn, ulp

import diffkern as dk

pytestmark = [needs_native, pytest.mark.skipif(not hasattr(torch.ops.diffkern, "euler_step"),
                                                  reason="no native sampler ops")]
R = dk.reference
F64 = torch.float64
HALF = (torch.float16, torch.bfloat16)

# name -> f(module, a): a holds x, m, x2, m2, z and the case's levels / timesteps
OPS = {
    "euler": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0),
    "euler_eps": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, prediction_type="epsilon"),
    "euler_v": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, prediction_type="v_prediction"),
    "euler_ancestral": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, eta=1.0, noise=a.z),
    "euler_ancestral_eta.5_eps": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, eta=0.5, s_noise=0.9,
                                                           prediction_type="epsilon", noise=a.z),
    "euler_churn_eps": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, gamma=0.3, s_noise=1.1,
                                                 prediction_type="epsilon", noise=a.z),
    "euler_churn_v": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, gamma=0.2, prediction_type="v_prediction",
                                               noise=a.z),
    "euler_churn_sample": lambda o, a: o.euler_step(a.x, a.m, a.s, a.sn0, gamma=0.41, noise=a.z),
    "heun": lambda o, a: o.heun_step(a.x, a.m, a.x2, a.m2, a.s, a.sn),
    "heun_eps": lambda o, a: o.heun_step(a.x, a.m, a.x2, a.m2, a.s, a.sn, prediction_type="epsilon"),
    "heun_v": lambda o, a: o.heun_step(a.x, a.m, a.x2, a.m2, a.s, a.sn, prediction_type="v_prediction"),
    "dpmpp_first": lambda o, a: o.dpmpp_2m_step(a.x, a.m, None, a.s, a.sn0),
    "dpmpp_midpoint": lambda o, a: o.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp),
    "dpmpp_heun_eps": lambda o, a: o.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp, solver_type="heun",
                                                   prediction_type="epsilon"),
    "dpmpp_vp_eps_midpoint": lambda o, a: o.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp,
                                                          prediction_type="epsilon", variance_preserving=True),
    "dpmpp_vp_v_heun_denoised": lambda o, a: o.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp, solver_type="heun",
                                                             prediction_type="v_prediction",
                                                             variance_preserving=True, return_denoised=True),
    "dpmpp_vp_sample_first": lambda o, a: o.dpmpp_2m_step(a.x, a.m, None, a.s, a.sn0, variance_preserving=True),
    "dpmpp_midpoint_v_denoised": lambda o, a: o.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp,
                                                              prediction_type="v_prediction", return_denoised=True),
    "flow": lambda o, a: o.flow_step(a.x, a.m, a.fs, a.fsn),
    "flow_stochastic": lambda o, a: o.flow_step(a.x, a.m, a.fs, a.fsn, stochastic=True, noise=a.z),
    "flow_q_sample": lambda o, a: o.flow_q_sample(a.x, a.fs, a.z)[0],
    "lcm": lambda o, a: o.lcm_step(a.x, a.m, a.t, a.tp, noise=a.z),
    "lcm_v_clip_denoised": lambda o, a: o.lcm_step(a.x, a.m, a.t, a.tp, prediction_type="v_prediction",
                                                   clip_sample=1.0, noise=a.z, return_denoised=True),
    "lcm_sample_cosine": lambda o, a: o.lcm_step(a.x, a.m, a.t, a.tp, prediction_type="sample", noise=a.z,
                                                 schedule=dk.NoiseSchedule.cosine(), timestep_scaling=7.0,
                                                 sigma_data=0.3),
}

# (shape, levels): "float" Python numbers, "final" numbers with sigma_next = 0 (t_prev = -1),
# "0d" 0-d tensors, "ps32"/"ps64" (B,) float32/float64 tensors (sigma_next = 0 in row 1)
CASES = [((1,), "float"), ((7,), "ps32"), ((7,), "final"), ((1023,), "0d"), ((3, 11, 31), "ps64"),
         ((3, 341), "float"), ((2, 4, 5, 6), "ps32")]


def _case_id(c):
    return f"{'x'.join(map(str, c[0]))}-{c[1]}"


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def _levels(B: int, kind: str, seed: int) -> dict:
    """sigma > sigma_next > 0 (sn0: >= 0), sigma_prev > sigma (k-diffusion's VE range), flow
    levels in [0, 1], LCM timesteps t > t_prev, as numbers or tensors per `kind`."""
    u = torch.rand(4, B, generator=gen(seed), dtype=F64)
    s = 0.05 + 14 * u[0]
    v = dict(s=s, sn=s * (0.15 + 0.8 * u[1]), sp=s * (1.1 + 2 * u[2]), fs=0.05 + 0.9 * u[3])
    v["sn0"] = v["sn"].clone()
    v["fsn"] = v["fs"] * (0.2 + 0.7 * u[1])
    v["t"] = (50 + 949 * u[3]).long()
    v["tp"] = (v["t"] * u[1]).long() - 1
    zero = slice(None) if kind == "final" else slice(1, 2) if kind.startswith("ps") else slice(0, 0)
    v["sn0"][zero] = 0.0
    v["fsn"][zero] = 0.0
    v["tp"][zero] = -1
    if kind in ("float", "final"):
        return {k: int(t[0]) if k in ("t", "tp") else float(t[0]) for k, t in v.items()}
    if kind == "0d":
        return {k: t[0].clone() for k, t in v.items()}
    dt = torch.float32 if kind == "ps32" else F64
    return {k: t if k in ("t", "tp") else t.to(dt) for k, t in v.items()}


def _args(shape, dtype, kind, seed, **overrides):
    a = SimpleNamespace(**_levels(shape[0] if shape else 1, kind, seed))
    for i, k in enumerate(("x", "m", "x2", "m2", "z")):
        setattr(a, k, randn(*shape, dtype=dtype, seed=seed + i))
    for k, v in overrides.items():
        setattr(a, k, v)
    return a


def _up(a):
    """The same inputs upcast to float64 (the levels as they are)."""
    b = SimpleNamespace(**vars(a))
    for k in ("x", "m", "x2", "m2", "z"):
        setattr(b, k, getattr(a, k).double())
    return b


def _outs(r):
    return r if isinstance(r, tuple) else (r,)


def _assert_half_close(got, ref, what):
    g, r = got.double(), ref.double()
    tol = 2 * ulp(ref, ref.dtype) + 1e-6 * r.abs().max()
    bad = ~((g - r).abs() <= tol)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements beyond 2 ulp, first got {g[bad][0]} ref {r[bad][0]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("name", list(OPS))
def test_float64_native_vs_reference(name, case):
    shape, kind = case
    a = _args(shape, F64, kind, _seed(name, case))
    got, ref = _outs(OPS[name](dk, a)), _outs(OPS[name](R, a))
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == F64 and g.shape == a.x.shape
        err = max_rel_err(g, r)
        assert err <= 1e-13, f"{name} {case}: rel err {err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("name", list(OPS))
def test_float32_native_vs_reference64(name, case):
    shape, kind = case
    a = _args(shape, torch.float32, kind, _seed(name, case, 32))
    got, ref = _outs(OPS[name](dk, a)), _outs(OPS[name](R, _up(a)))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32 and g.shape == a.x.shape and g.is_contiguous()
        err = max_rel_err(g, r)
        assert err <= 1e-6, f"{name} {case}: rel err {err:.3g}"


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_case_id)
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(OPS))
def test_half_native_vs_reference(name, dtype, case):
    shape, kind = case
    a = _args(shape, dtype, kind, _seed(name, case, 16))
    got, ref = _outs(OPS[name](dk, a)), _outs(OPS[name](R, a))
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype
        _assert_half_close(g, r, f"{name} {dtype} {case}")


@pytest.mark.parametrize("name", ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample",
                                  "lcm_step", "linear_step"])
def test_the_native_path_runs(name, monkeypatch):
    """A test that cannot fail is a defect: make sure dk.* above is not the reference. Every
    public family op reaches the native op, through the extension's eager entry
    (csrc/torch/fast_call.cpp) or the native function of diffkern._native_samplers
    (through diffkern.unchecked), not the reference's."""
    from diffkern import _native_samplers as N
    from diffkern import reference_samplers as RS
    from diffkern import sampler_ops as S
    a = _args((3, 5), torch.float32, "float", 1)
    calls, native = [], getattr(N, name)
    monkeypatch.setattr(N, name, lambda *args: calls.append(1) or native(*args))

    class Counting:  # the eager entries, counted
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, k):
            f = getattr(self.mod, k)
            return (lambda *args: calls.append(1) or f(*args)) if k == "_" + name else f

    if S._F is not None:
        monkeypatch.setattr(S, "_F", Counting(S._F))
    ref = {"euler_step": "_euler", "heun_step": "_heun", "dpmpp_2m_step": "_dpmpp_2m", "flow_step": "_flow",
           "flow_q_sample": "_flow_q_sample", "lcm_step": "_lcm", "linear_step": "_linear"}[name]
    monkeypatch.setattr(RS, ref, lambda *args: pytest.fail(f"{name} ran the reference"))
    x, m = a.x, a.m
    {"euler_step": lambda: dk.euler_step(x, m, 2.0, 1.0),
     "heun_step": lambda: dk.heun_step(x, m, x, m, 2.0, 1.0),
     "dpmpp_2m_step": lambda: dk.dpmpp_2m_step(x, m, m, 2.0, 1.0, 3.0),
     "flow_step": lambda: dk.flow_step(x, m, 0.5, 0.25, stochastic=True),
     "flow_q_sample": lambda: dk.flow_q_sample(x, 0.5),
     "lcm_step": lambda: dk.lcm_step(x, m, 500, 300),
     "linear_step": lambda: dk.linear_step([x, m], [[1.0, 2.0]])}[name]()
    assert calls == [1]


# ---- strides and broadcasting --------------------------------------------------------
def _noncontig(kind, shape, dtype, seed):
    B, C, H, W = shape
    if kind == "transposed":
        return randn(B, C, W, H, dtype=dtype, seed=seed).transpose(-1, -2)
    if kind == "sliced":
        return randn(B, C, H, 2 * W + 1, dtype=dtype, seed=seed)[..., ::2][..., :W]
    if kind == "expanded":
        return randn(1, C, H, W, dtype=dtype, seed=seed).expand(B, C, H, W)
    if kind == "permuted":
        return randn(H, W, B, C, dtype=dtype, seed=seed).permute(2, 3, 0, 1)
    raise AssertionError(kind)


LAYOUTS = [("transposed", "sliced", "expanded", "permuted", "sliced"),
           ("permuted", "transposed", "sliced", "expanded", "expanded")]


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])  # float32: the broadcast test's strided path
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tsepS", "ptstE"])
@pytest.mark.parametrize("name", list(OPS))
def test_noncontiguous_operands(name, layout, dtype):
    shape = (3, 4, 5, 6)
    a = _args(shape, dtype, "ps64", 3)
    for k, kind in zip(("x", "m", "x2", "m2", "z"), layout, strict=True):
        setattr(a, k, _noncontig(kind, shape, dtype, 40 + len(k)))
    got = _outs(OPS[name](dk, a))
    c = SimpleNamespace(**vars(a))
    for k in ("x", "m", "x2", "m2", "z"):
        setattr(c, k, getattr(a, k).contiguous())
    same = _outs(OPS[name](dk, c))
    for g, s in zip(got, same, strict=True):
        assert g.is_contiguous() and torch.equal(g, s), name  # the strided loop = the vector loop
    ref = _outs(OPS[name](R, a if dtype in HALF else _up(a)))
    for g, r in zip(got, ref, strict=True):
        if dtype in HALF:
            _assert_half_close(g, r, name)
        else:
            assert max_rel_err(g, r) <= (1e-13 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("bshape", [(1, 4, 5, 6), (3, 1, 1, 6)])
@pytest.mark.parametrize("name", list(OPS))
def test_broadcast_model_outputs(name, bshape):
    shape = (3, 4, 5, 6)
    a = _args(shape, torch.float32, "ps32", 4)
    for i, k in enumerate(("m", "m2", "z")):
        setattr(a, k, randn(*bshape, seed=50 + i))
    got = _outs(OPS[name](dk, a))
    full = SimpleNamespace(**vars(a))
    for k in ("m", "m2", "z"):
        setattr(full, k, getattr(a, k).expand(shape).contiguous())
    for g, f, r in zip(got, _outs(OPS[name](dk, full)), _outs(OPS[name](R, _up(a))), strict=True):
        assert g.shape == shape and torch.equal(g, f)
        assert max_rel_err(g, r) <= 1e-6


def test_mixed_dtypes_promote_like_the_reference():
    a = _args((3, 17), torch.float32, "ps32", 5)
    m16 = a.m.to(torch.float16)
    got = dk.dpmpp_2m_step(a.x.to(torch.bfloat16), m16, None, a.s, a.sn0, return_denoised=True)
    ref = R.dpmpp_2m_step(a.x.to(torch.bfloat16), m16, None, a.s, a.sn0, return_denoised=True)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float32
        assert max_rel_err(g, r) <= 1e-6
    got = dk.euler_step(a.x, m16, a.s, a.sn0)
    assert got.dtype == torch.float32 and max_rel_err(got, R.euler_step(a.x, m16, a.s, a.sn0)) <= 1e-6


MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
         (torch.float32, torch.float64), (torch.float64, torch.float16), (torch.bfloat16, torch.float16)]
MIXED_OPS = {
    "ddim": lambda o, x, m, z, s: o.ddim_step(x, m, torch.tensor([700, 300]), 1.0, t_prev=torch.tensor([400, -1]),
                                              noise=z, clip_sample=1.0),
    "ddpm": lambda o, x, m, z, s: o.ddpm_step(x, m, torch.tensor([700, 300]), variance="fixed_large",
                                              prediction_type="v_prediction", noise=z),
    "q_sample": lambda o, x, m, z, s: o.q_sample(x, torch.tensor([700, 300]), z)[0],
    "langevin": lambda o, x, m, z, s: o.langevin_step(x, m, 0.01, noise=z),
    "euler_a": lambda o, x, m, z, s: o.euler_step(x, m, s, s * 0.5, eta=1.0, noise=z),
    "euler_churn": lambda o, x, m, z, s: o.euler_step(x, m, s, s * 0.5, gamma=0.3, noise=z,
                                                      prediction_type="epsilon"),
    "heun": lambda o, x, m, z, s: o.heun_step(x, m, z, m, s, s * 0.5, prediction_type="v_prediction"),
    "dpmpp_2m": lambda o, x, m, z, s: o.dpmpp_2m_step(x, m, z, s, s * 0.5, s * 2, return_denoised=True),
    "flow": lambda o, x, m, z, s: o.flow_step(x, m, s / 4, s / 8, stochastic=True, noise=z),
    "flow_q": lambda o, x, m, z, s: o.flow_q_sample(x, s / 4, z)[0],
    "lcm": lambda o, x, m, z, s: o.lcm_step(x, m, 700, 400, noise=z, return_denoised=True),
    "linear": lambda o, x, m, z, s: o.linear_step([x, m, z], [[1.0, -0.5, 0.25], [0.5, 0.5, 0.0]],
                                                  noise_coeffs=[0.1, 0.0], noise=m),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("xd,md", MIXED, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(MIXED_OPS))
def test_mixed_dtypes_over_chunks(name, xd, md, layout):
    """Operands of other dtypes than the result's, over several of the driver's chunks
    (2048 elements) and an odd tail: loaded in their own dtype (contiguous) or cast first
    (channels_last beside contiguous operands), the result in the promoted dtype, equal to
    the reference's (float64 results to 1e-13; float32 ones to 1e-6 relative)."""
    shape = (2, 3, 37, 41)  # 4551 elements per sample
    x = randn(*shape, seed=601).to(xd)
    m, z = randn(*shape, seed=602).to(md), randn(*shape, seed=603).to(md)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    s = torch.tensor([1.5, 2.5])
    got, ref = MIXED_OPS[name](dk, x, m, z, s), MIXED_OPS[name](R, x, m, z, s)
    for g, r in zip(_outs(got), _outs(ref), strict=True):
        assert g.dtype == r.dtype == torch.promote_types(xd, md)
        assert g.is_contiguous(memory_format=dk._validate.output_format(x))
        assert max_rel_err(g, r) <= (1e-13 if g.dtype == F64 else 1e-6)


# ---- per-sample scalars ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(OPS))
def test_per_sample_equals_loop(name, dtype):
    B = 5
    a = _args((B, 3, 7), dtype, "ps64", 6)
    batched = _outs(OPS[name](dk, a))
    rows = []
    for i in range(B):
        r = SimpleNamespace(**vars(a))
        for k in ("x", "m", "x2", "m2", "z"):
            setattr(r, k, getattr(a, k)[i:i + 1])
        for k in ("s", "sn", "sp", "fs", "fsn", "sn0"):
            setattr(r, k, float(getattr(a, k)[i]))
        for k in ("t", "tp"):
            setattr(r, k, int(getattr(a, k)[i]))
        rows.append(_outs(OPS[name](dk, r)))
    for j, out in enumerate(batched):
        loop = torch.cat([r[j] for r in rows])
        # the same coefficients in the same order: equal (a number and a float64 tensor entry
        # are the same double)
        assert torch.equal(out, loop), name


def test_dpmpp_final_rows_are_the_denoised_sample_exactly():
    a = _args((4, 9), torch.float32, "ps64", 7)
    out, den = dk.dpmpp_2m_step(a.x, a.m, a.m2, a.s, a.sn0, a.sp, prediction_type="epsilon", return_denoised=True)
    assert torch.equal(out[1], den[1]) and not torch.equal(out[0], den[0])
    out, den = dk.dpmpp_2m_step(a.x, a.m, None, a.s, 0.0, variance_preserving=True, prediction_type="v_prediction",
                                return_denoised=True)
    assert torch.equal(out, den)


# ---- drawn noise (generator=) ----------------------------------------------------------
GEN_OPS = {
    "euler_ancestral": lambda o, a, g, **kw: o.euler_step(a.x, a.m, a.s, a.sn0, eta=1.0, generator=g, **kw),
    "euler_churn_v": lambda o, a, g, **kw: o.euler_step(a.x, a.m, a.s, a.sn0, gamma=0.25,
                                                        prediction_type="v_prediction", generator=g, **kw),
    "flow_stochastic": lambda o, a, g, **kw: o.flow_step(a.x, a.m, a.fs, a.fsn, stochastic=True, generator=g, **kw),
    "flow_q_sample": lambda o, a, g, **kw: o.flow_q_sample(a.x, a.fs, generator=g, **kw),
    "lcm": lambda o, a, g, **kw: o.lcm_step(a.x, a.m, a.t, a.tp, generator=g, return_denoised=True, **kw),
    "lcm_final": lambda o, a, g, **kw: o.lcm_step(a.x, a.m, 40, -1, generator=g, **kw),
}


def _assert_noise_close(got, ref):
    for g, r in zip(_outs(got), _outs(ref), strict=True):
        assert g.dtype == r.dtype
        assert (g.double() - r.double()).abs().max().item() <= 2e-6 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(3,), (3, 5), (3, 1001)])
@pytest.mark.parametrize("name", list(GEN_OPS))
def test_drawn_noise_native_equals_reference(name, shape, dtype):
    a = _args(shape, dtype, "ps32", 8)
    gn, gr = gen(77), gen(77)
    for _ in range(2):  # and the generator advances the same way
        _assert_noise_close(GEN_OPS[name](dk, a, gn), GEN_OPS[name](R, a, gr))
    if name != "lcm_final":
        other = _outs(GEN_OPS[name](dk, a, gen(78)))[0]
        assert not torch.equal(_outs(GEN_OPS[name](dk, a, gen(77)))[0], other)
    # a draw after this op's draws: the same position of the stream
    _assert_noise_close(dk.flow_q_sample(a.x, 0.5, generator=gn), R.flow_q_sample(a.x, 0.5, generator=gr))


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(GEN_OPS))
def test_drawn_noise_half(name, dtype):
    a = _args((4, 257), dtype, "ps32", 9)
    got, ref = _outs(GEN_OPS[name](dk, a, gen(5))), _outs(GEN_OPS[name](R, a, gen(5)))
    for g, r in zip(got, ref, strict=True):
        _assert_half_close(g, r, name)


# ---- the CPU driver's large-size paths (streaming stores; fp16/bf16 staging) -------------
BIG = {
    "dpmpp_vp_v_heun_denoised": OPS["dpmpp_vp_v_heun_denoised"],  # two outputs
    "heun_eps": OPS["heun_eps"],  # four inputs
    "flow_q_sample_gen": lambda o, a: GEN_OPS["flow_q_sample"](o, a, gen(4)),  # drawn noise written out
}
BIG_SHAPE = (3, 2**19 * 3 // 2 + 5)  # 2^21 + 15 float32 elements: past kStreamBytes, a ragged last chunk


@pytest.mark.parametrize("name", ["dpmpp_vp_v_heun_denoised", "heun_eps"])
def test_outputs_past_the_streaming_threshold(name):
    """float32 outputs of 8 MiB and more are written with non-temporal stores from L1
    buffers; per-sample levels put sample boundaries inside chunks."""
    a = _args(BIG_SHAPE, torch.float32, "ps32", 10)
    for g, r in zip(_outs(BIG[name](dk, a)), _outs(BIG[name](R, _up(a))), strict=True):
        assert max_rel_err(g, r) <= 1e-6, name


def test_streaming_with_drawn_noise():
    """The drawn noise past the streaming threshold: flow_q_sample's noise output equals the
    Philox stream (checked on slices across chunk and sample boundaries; the whole stream in
    the reference takes seconds), x_t is formed from it, and the other drawing ops use the
    same noise for the same generator state as when it is passed in."""
    from diffkern import _rng

    a = _args(BIG_SHAPE, torch.float32, "ps32", 12)
    xt, z = dk.flow_q_sample(a.x, a.fs, generator=gen(4))
    flat = z.reshape(-1)
    n = flat.numel()
    key = _rng.py_cpu_generator_key(gen(4))  # the key gen(4)'s state gives
    for start, count in ((0, 4100), (2**21 - 2048 - 3, 4096 + 3 + 15), (n // 3 - 7, 21), (n - 9, 9)):
        want = _rng.philox_normal(count, *key, start=start)
        assert (flat[start:start + count].double() - want.double()).abs().max().item() <= 2e-6
    s = a.fs.double().view(-1, 1)
    assert max_rel_err(xt, (1 - s) * a.x.double() + s * z.double()) <= 1e-6
    for name in ("euler_ancestral", "lcm"):
        drawn = _outs(GEN_OPS[name](dk, a, gen(4)))
        a.z = z
        given = _outs(OPS[name](dk, a))
        assert torch.equal(drawn[0], given[0]), name


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(BIG))
def test_half_staged_large(name, dtype):
    a = _args((4, 8192 + 3), dtype, "ps32", 11)  # 16 chunks, a ragged last one
    for g, r in zip(_outs(BIG[name](dk, a)), _outs(BIG[name](R, a)), strict=True):
        _assert_half_close(g, r, name)


def test_one_element_zero_dim_and_empty():
    x = randn(1, seed=1).reshape(())
    m = randn(1, seed=2).reshape(())
    assert max_rel_err(dk.euler_step(x, m, 3.0, 1.0), R.euler_step(x, m, 3.0, 1.0)) <= 1e-6
    e = torch.empty(0, 3)
    assert dk.heun_step(e, e, e, e, 2.0, 1.0).shape == (0, 3)
    assert dk.flow_q_sample(e, 0.3)[0].shape == (0, 3)


def test_nan_propagates():
    a = _args((4, 33), torch.float32, "float", 12)
    a.x[1, 3] = float("nan")
    a.m[2, 5] = float("nan")
    for name in ("euler_eps", "heun_v", "dpmpp_midpoint", "flow_stochastic", "lcm_v_clip_denoised"):
        for g, r in zip(_outs(OPS[name](dk, a)), _outs(OPS[name](R, a)), strict=True):
            assert torch.equal(g.isnan(), r.isnan()) and bool(g.isnan().any()), name


# ---- opcheck on the raw ops --------------------------------------------------------------
def _raw_cases():
    x, m, o, z = (randn(3, 5, dtype=F64, seed=70 + i) for i in range(4))
    s = torch.tensor([3.0, 2.0, 0.5], dtype=F64)
    sn = torch.tensor([1.0, 0.0, 0.2], dtype=torch.float32)
    t, tp = torch.tensor([700, 500, 20]), torch.tensor([400, -1, 3])
    table = dk.NoiseSchedule.linear().table("cpu")
    ops = torch.ops.diffkern
    return {
        "euler_step": (ops.euler_step.default, (x, m, s, sn, 0.0, 0.0, 1.0, 1.0, 0.0, 0, z, None, 0, 0)),
        "euler_step_churn": (ops.euler_step.default, (x, m, None, None, 2.0, 1.0, 0.0, 1.0, 0.2, 2, None, None, 5, 8)),
        "heun_step": (ops.heun_step.default, (x, m, o, z, s, None, 0.0, 0.4, 2)),
        "dpmpp_2m_step": (ops.dpmpp_2m_step.default, (x, m, o, s, sn, s * 2, 0.0, 0.0, 0.0, 0, 1, True, True)),
        "dpmpp_2m_step_first": (ops.dpmpp_2m_step.default, (x, m, None, None, None, None, 2.0, 1.0, 0.0, 1, 0,
                                                            False, False)),
        "flow_step": (ops.flow_step.default, (x, m, None, sn, 0.7, 0.0, True, z, None, 0, 0)),
        "flow_q_sample": (ops.flow_q_sample.default, (x, None, 0.3, z, None, 0, 0)),
        "flow_q_sample_drawn": (ops.flow_q_sample.default, (x, s / 4, 0.0, None, None, 3, 4)),
        "lcm_step": (ops.lcm_step.default, (x, m, t, tp, table, 10.0, 0.5, 2, 1.0, True, z, None, 0, 0, True)),
        "lcm_step_backward": (ops.lcm_step_backward.default, (z, o, x, m, t, tp, table, 10.0, 0.5, 0, 1.5)),
    }


RAW_CASES = ("euler_step", "euler_step_churn", "heun_step", "dpmpp_2m_step", "dpmpp_2m_step_first", "flow_step",
             "flow_q_sample", "flow_q_sample_drawn", "lcm_step", "lcm_step_backward")


def test_raw_case_names():
    assert tuple(_raw_cases()) == RAW_CASES


# Names listed, not read from _raw_cases() at collection: without the extension the ops
# are not registered, and the module must still collect (and skip) on the fallback.
@pytest.mark.parametrize("name", RAW_CASES)
def test_opcheck(name):
    op, args = _raw_cases()[name]
    args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.dtype == F64 and a.dim() == 2
                 and name != "lcm_step_backward" else a for a in args)
    torch.library.opcheck(op, args)


# ---- gradients -----------------------------------------------------------------------------
GRAD_OPS = {  # name -> (f(module, a) over a's tensors, names of the tensors to differentiate)
    "euler_v": (OPS["euler_v"], ("x", "m")),
    "euler_ancestral_eta.5_eps": (OPS["euler_ancestral_eta.5_eps"], ("x", "m", "z")),
    "euler_churn_v": (OPS["euler_churn_v"], ("x", "m", "z")),
    "heun_eps": (OPS["heun_eps"], ("x", "m", "x2", "m2")),
    "dpmpp_heun_eps": (OPS["dpmpp_heun_eps"], ("x", "m", "m2")),
    "dpmpp_vp_v_heun_denoised": (OPS["dpmpp_vp_v_heun_denoised"], ("x", "m", "m2")),
    "dpmpp_first": (OPS["dpmpp_first"], ("x", "m")),
    "flow": (OPS["flow"], ("x", "m")),
    "flow_stochastic": (OPS["flow_stochastic"], ("x", "m", "z")),
    "flow_q_sample": (lambda o, a: o.flow_q_sample(a.x, a.fs, a.z), ("x", "z")),
    "lcm": (OPS["lcm"], ("x", "m", "z")),
    "lcm_v_clip_denoised": (OPS["lcm_v_clip_denoised"], ("x", "m", "z")),
}


def _with_grad(a, names):
    b = SimpleNamespace(**vars(a))
    for k in names:
        setattr(b, k, getattr(a, k).detach().clone().requires_grad_(True))
    return b


def _loss(outs, weights):
    return sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=False) if o.requires_grad)


@pytest.mark.parametrize("kind", ["float", "ps64"])
@pytest.mark.parametrize("name", list(GRAD_OPS))
def test_native_backward_equals_reference_autograd(name, kind):
    f, names = GRAD_OPS[name]
    a = _args((3, 4, 5), F64, kind, _seed(name, kind, "grad"))
    a.x = a.x * 0.5  # keep x0 inside the clip range for most elements, outside for some
    weights = [randn(3, 4, 5, dtype=F64, seed=90 + i) for i in range(2)]
    grads = []
    for module in (dk, R):
        b = _with_grad(a, names)
        outs = _outs(f(module, b))
        assert all(o.requires_grad for o in outs[:1])
        g = torch.autograd.grad(_loss(outs, weights), [getattr(b, k) for k in names])
        grads.append(g)
    for k, gn, gr in zip(names, *grads, strict=True):
        assert gn.shape == gr.shape
        if not bool(gr.abs().max() > 0):  # heun eps: d out/d x_proposal cancels exactly
            assert bool(gn.abs().max() <= 1e-15), f"{name} d/d{k}"
            continue
        assert max_rel_err(gn, gr) <= 1e-12, f"{name} d/d{k}"


@pytest.mark.parametrize("name", list(GRAD_OPS))
def test_gradcheck_native(name):
    f, names = GRAD_OPS[name]
    a = _args((2, 3), F64, "ps64", _seed(name, "gradcheck"))
    a.x = a.x * 0.5

    def fn(*tensors):
        b = SimpleNamespace(**vars(a))
        for k, t in zip(names, tensors, strict=True):
            setattr(b, k, t)
        return f(dk, b)

    torch.autograd.gradcheck(fn, [getattr(a, k).detach().clone().requires_grad_(True) for k in names])


def test_backward_to_broadcast_model_output_and_float32():
    a = _args((3, 4, 5), torch.float32, "ps32", 95)
    m = randn(4, 5, seed=96).requires_grad_(True)
    x = a.x.clone().requires_grad_(True)
    out = dk.euler_step(x, m, a.s, a.sn0, prediction_type="epsilon")
    gx, gm = torch.autograd.grad(out.sum(), [x, m])
    mr = m.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    ref = R.euler_step(xr, mr, a.s, a.sn0, prediction_type="epsilon")
    rx, rm = torch.autograd.grad(ref.sum(), [xr, mr])
    assert gm.shape == (4, 5) and gx.dtype == torch.float32
    assert max_rel_err(gx, rx) <= 1e-6 and max_rel_err(gm, rm) <= 1e-6


def test_compile_traces_the_native_ops():
    """Under torch.compile the graph holds the native ops themselves (not the reference's
    torch ops), and the compiled result is the eager one. Both run the same kernel, so that
    equality cannot see a numeric bug they share: the eager result is also held to the
    float64 reference."""
    a = _args((2, 3, 4), torch.float32, "ps32", 97)

    def f(x, m, old, ops=dk):
        x1 = ops.euler_step(x, m, a.s, a.sn0)
        return ops.dpmpp_2m_step(x1, m, old, a.s, a.sn0, a.sp, return_denoised=True)

    traced = []

    def recording_backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=recording_backend)(a.x, a.m, a.m2)
    assert any("diffkern.euler_step" in t for t in traced), traced
    assert any("diffkern.dpmpp_2m_step" in t for t in traced), traced
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=False)(a.x, a.m, a.m2)
    want = f(a.x, a.m, a.m2)
    ref = f(a.x.double(), a.m.double(), a.m2.double(), ops=R)
    for g, w, r in zip(got, want, ref, strict=True):
        assert torch.equal(g, w)
        assert max_rel_err(w, r) <= 1e-6


def test_final_rows_take_no_noise_term():
    """Rows at their final step (sigma_next = 0, t_prev < 0) are the reference's exactly,
    even for a non-finite noise: a select in the kernel, not 0 * z."""
    a = _args((3, 4, 5), torch.float32, "ps32", 98)
    a.z = torch.full_like(a.x, float("inf"))
    for name in ("euler_ancestral", "lcm_v_clip_denoised"):
        got, ref = _outs(OPS[name](dk, a))[0], _outs(OPS[name](R, a))[0]
        assert torch.isfinite(got[1]).all() and not torch.isfinite(got[0]).any(), name
        assert torch.equal(got.isfinite(), ref.isfinite()) and max_rel_err(got[1], ref[1]) <= 1e-6, name
