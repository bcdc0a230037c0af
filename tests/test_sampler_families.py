"""The sampler-family ops (Euler, Euler ancestral, churn, Heun, DPM-Solver++(2M), flow
matching, LCM): the reference against closed forms in float64, the public ops against the
float64 reference over dtypes, shapes, strides, per-sample scalars and noise sources,
gradcheck, the native hook, and bad inputs. Runs with and without the native ops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PREDICTION_TYPES, ab_of, gen, max_rel_err, randn

import diffkern as dk
from diffkern import _rng, sampler_ops

R = dk.reference
F64 = torch.float64
SCHED = dk.NoiseSchedule.scaled_linear()
B = 3
SHAPE = (B, 4, 5)


# ---- closed forms (k-diffusion / diffusers, per sample, Python floats) -----------------------
def model_outputs(x0, eps, s):
    """What an exact model predicts for x = x0 + s eps (VE): x0, eps, and v = alpha eps -
    sigma_vp x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s alpha (Salimans & Ho 2022)."""
    alpha = 1 / math.sqrt(1 + s * s)
    return {"sample": x0, "epsilon": eps, "v_prediction": alpha * eps - s * alpha * x0}


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def levels(seed, lo=1.0, hi=3.0):
    g = gen(seed)
    return (lo + (hi - lo) * torch.rand(B, generator=g, dtype=F64)).tolist()


def per_sample(fn, *tensors_and_levels):
    """Stack fn(sample i's tensors, sample i's floats) over the batch."""
    rows = []
    for i in range(B):
        rows.append(fn(*[a[i] if isinstance(a, torch.Tensor) else a[i] for a in tensors_and_levels]))
    return torch.stack(rows)


def t64(v):
    return torch.tensor(v, dtype=F64)


# ---- prediction types ------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_euler_prediction_types_recover_x0_exactly(prediction_type):
    # For x = x0 + s eps, every prediction type of an exact model must give the same step
    # as the denoised form; and Euler is exact for a constant D: x' = D + (x - D) sn/s.
    x0, eps = randn(*SHAPE, dtype=F64, seed=1), randn(*SHAPE, dtype=F64, seed=2)
    s, sn = levels(3), [u * 0.4 for u in levels(4)]
    x = x0 + t64(s)[:, None, None] * eps
    m = per_sample(lambda a0, e, si: model_outputs(a0, e, si)[prediction_type], x0, eps, s)
    got = R.euler_step(x, m, t64(s), t64(sn), prediction_type=prediction_type)
    want = x0 + (x - x0) * (t64(sn) / t64(s))[:, None, None]
    assert max_rel_err(got, want) < 1e-13


@pytest.mark.parametrize("final", [False, True])
def test_euler_ancestral_closed_form(final):
    x, den, z = (randn(*SHAPE, dtype=F64, seed=k) for k in (5, 6, 7))
    s = levels(8)
    sn = [0.0] * B if final else [u * f for u, f in zip(s, (0.3, 0.55, 0.9), strict=True)]
    for eta, s_noise in ((1.0, 1.0), (0.5, 1.3), (3.0, 0.7)):
        def one(xi, di, zi, si, sni, eta=eta, s_noise=s_noise):
            down, up = get_ancestral_step(si, sni, eta)
            out = xi + (xi - di) / si * (down - si)
            return out + zi * s_noise * up if sni > 0 else out
        got = R.euler_step(x, den, t64(s), t64(sn), eta=eta, s_noise=s_noise, noise=z)
        assert max_rel_err(got, per_sample(one, x, den, z, s, sn)) < 1e-13
        if final:
            assert (got - den).abs().max() <= 1e-14  # the last step lands on D


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_euler_churn_is_diffusers_euler_discrete(prediction_type):
    # EulerDiscreteScheduler.step with s_churn: churn after the model ran at sigma
    x, m, z = (randn(*SHAPE, dtype=F64, seed=k) for k in (9, 10, 11))
    s, sn = levels(12), [u * 0.5 for u in levels(13)]
    gamma, s_noise = 0.2, 1.1

    def one(xi, mi, zi, si, sni):
        sigma_hat = si * (gamma + 1)
        xi = xi + zi * s_noise * (sigma_hat**2 - si**2) ** 0.5
        if prediction_type == "sample":
            x0 = mi
        elif prediction_type == "epsilon":
            x0 = xi - sigma_hat * mi
        else:
            x0 = mi * (-si / (si**2 + 1) ** 0.5) + xi / (si**2 + 1)
        d = (xi - x0) / sigma_hat
        return xi + d * (sni - sigma_hat)

    got = R.euler_step(x, m, t64(s), t64(sn), gamma=gamma, s_noise=s_noise, prediction_type=prediction_type,
                       noise=z)
    assert max_rel_err(got, per_sample(one, x, m, z, s, sn)) < 1e-13


# ---- Heun ------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_heun_closed_form(prediction_type):
    x0a, x0b, eps = (randn(*SHAPE, dtype=F64, seed=k) for k in (14, 15, 16))
    s, sn = levels(17), [u * 0.6 for u in levels(18)]
    x = x0a + t64(s)[:, None, None] * eps
    xp = randn(*SHAPE, dtype=F64, seed=19)
    eps_p = (xp - x0b) / t64(sn)[:, None, None]
    m1 = per_sample(lambda a, e, si: model_outputs(a, e, si)[prediction_type], x0a, eps, s)
    m2 = per_sample(lambda a, e, si: model_outputs(a, e, si)[prediction_type], x0b, eps_p, sn)

    def one(xi, xpi, da, db, si, sni):  # k-diffusion sample_heun, stage 2
        d, d2 = (xi - da) / si, (xpi - db) / sni
        return xi + (d + d2) / 2 * (sni - si)

    got = R.heun_step(x, m1, xp, m2, t64(s), t64(sn), prediction_type=prediction_type)
    assert max_rel_err(got, per_sample(one, x, xp, x0a, x0b, s, sn)) < 1e-12


def test_heun_is_exact_for_constant_denoiser():
    x, den = randn(*SHAPE, dtype=F64, seed=20), randn(*SHAPE, dtype=F64, seed=21)
    s, sn = 2.5, 0.7
    xp = R.euler_step(x, den, s, sn)
    got = R.heun_step(x, den, xp, den, s, sn)
    assert max_rel_err(got, den + (x - den) * (sn / s)) < 1e-14


# ---- DPM-Solver++(2M) ------------------------------------------------------------------
def dpm_k(x, den, old, s, sn, sp):
    """k-diffusion sample_dpmpp_2m, one step, Python floats for the scalars."""
    t, t_next = -math.log(s), (-math.log(sn) if sn > 0 else math.inf)
    h = t_next - t
    if old is None or sn == 0:
        return (sn / s) * x - math.expm1(-h) * den
    r = (t + math.log(sp)) / h
    den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
    return (sn / s) * x - math.expm1(-h) * den_d


def test_dpmpp_2m_first_and_second_order_are_k_diffusion():
    x, den, old = (randn(*SHAPE, dtype=F64, seed=k) for k in (22, 23, 24))
    s = levels(25)
    sn = [u * 0.6 for u in s]
    sp = [u * 1.4 for u in s]
    got1 = R.dpmpp_2m_step(x, den, None, t64(s), t64(sn))
    assert max_rel_err(got1, per_sample(lambda a, b, si, sni: dpm_k(a, b, None, si, sni, None), x, den, s, sn)) < 1e-13
    got2 = R.dpmpp_2m_step(x, den, old, t64(s), t64(sn), t64(sp))
    want2 = per_sample(lambda a, b, c, si, sni, spi: dpm_k(a, b, c, si, sni, spi), x, den, old, s, sn, sp)
    assert max_rel_err(got2, want2) < 1e-13


def test_dpmpp_2m_final_step_is_denoised_exactly():
    x, den, old = (randn(*SHAPE, dtype=F64, seed=k) for k in (26, 27, 28))
    for o in (None, old):
        out, d = R.dpmpp_2m_step(x, den, o, 1.3, 0.0, 2.0, return_denoised=True)
        assert torch.equal(out, den) and torch.equal(d, den)
    # per sample: one sample at sigma 0 among others
    sn = t64([0.0, 0.5, 0.9])
    out = R.dpmpp_2m_step(x, den, old, t64([1.0, 1.0, 1.2]), sn, t64([1.5, 2.0, 3.0]))
    assert torch.equal(out[0], den[0])
    assert max_rel_err(out[1], dpm_k(x[1], den[1], old[1], 1.0, 0.5, 2.0)) < 1e-13


def test_dpmpp_2m_heun_solver_is_exact_for_denoiser_linear_in_lambda():
    # D(lambda) = a + b lambda (lambda = -log sigma): the ODE x' = (sn/s) x + sn int e^l D dl
    # has a closed form, and diffusers' "heun" 2M update integrates a linear D exactly.
    a, b, x = (randn(*SHAPE, dtype=F64, seed=k) for k in (29, 30, 31))
    sp, s, sn = 3.0, 1.7, 0.6
    lp, ls, ln = -math.log(sp), -math.log(s), -math.log(sn)
    den, old = a + b * ls, a + b * lp
    # sn * int_{ls}^{ln} e^l (a + b l) dl = sn [e^l (a + b (l - 1))]_{ls}^{ln}
    exact = (sn / s) * x + sn * (math.exp(ln) * (a + b * (ln - 1)) - math.exp(ls) * (a + b * (ls - 1)))
    got = R.dpmpp_2m_step(x, den, old, s, sn, sp, solver_type="heun")
    assert max_rel_err(got, exact) < 1e-13
    # the midpoint form is only second-order accurate: it must differ
    assert max_rel_err(R.dpmpp_2m_step(x, den, old, s, sn, sp), exact) > 1e-4


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_variance_preserving_is_diffusers_multistep(prediction_type, solver_type):
    # DPMSolverMultistepScheduler (dpmsolver++, order 2), written with its lambdas and D1
    x_vp, m, old = (randn(*SHAPE, dtype=F64, seed=k) for k in (32, 33, 34))
    s, sn, sp = levels(35, 1.0, 2.0), levels(36, 0.2, 0.8), levels(37, 2.5, 4.0)

    def one(xi, mi, oi, si, sni, spi):
        def alpha_sigma(sig):
            alpha = 1 / (sig**2 + 1) ** 0.5
            return alpha, sig * alpha
        a_t, s_t = alpha_sigma(sni)
        a_s0, s_s0 = alpha_sigma(si)
        a_s1, s_s1 = alpha_sigma(spi)
        lam_t, lam_s0, lam_s1 = (math.log(u) - math.log(v) for u, v in ((a_t, s_t), (a_s0, s_s0), (a_s1, s_s1)))
        if prediction_type == "epsilon":
            x0 = (xi - s_s0 * mi) / a_s0
        elif prediction_type == "v_prediction":
            x0 = a_s0 * xi - s_s0 * mi
        else:
            x0 = mi
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        D0, D1 = x0, (1.0 / r0) * (x0 - oi)
        if solver_type == "midpoint":
            return (s_t / s_s0) * xi - a_t * (math.exp(-h) - 1.0) * D0 - 0.5 * (a_t * (math.exp(-h) - 1.0)) * D1
        return (s_t / s_s0) * xi - a_t * (math.exp(-h) - 1.0) * D0 + a_t * ((math.exp(-h) - 1.0) / h + 1.0) * D1

    got, den = R.dpmpp_2m_step(x_vp, m, old, t64(s), t64(sn), t64(sp), prediction_type=prediction_type,
                               solver_type=solver_type, variance_preserving=True, return_denoised=True)
    assert max_rel_err(got, per_sample(one, x_vp, m, old, s, sn, sp)) < 1e-12
    # first-order step, and the final step lands on x0
    got1 = R.dpmpp_2m_step(x_vp, m, None, t64(s), 0.0, prediction_type=prediction_type, variance_preserving=True)
    assert max_rel_err(got1, den) < 1e-14


# ---- flow matching ---------------------------------------------------------------------
def test_flow_step_follows_the_straight_path():
    x0, z = randn(*SHAPE, dtype=F64, seed=38), randn(*SHAPE, dtype=F64, seed=39)
    s, sn = levels(40, 0.5, 0.95), levels(41, 0.05, 0.45)
    xs, _ = R.flow_q_sample(x0, t64(s), z)
    col = t64(s)[:, None, None]
    assert max_rel_err(xs, (1 - col) * x0 + col * z) < 1e-15
    got = R.flow_step(xs, z - x0, t64(s), t64(sn))  # exact velocity: the step is exact
    coln = t64(sn)[:, None, None]
    assert max_rel_err(got, (1 - coln) * x0 + coln * z) < 1e-14
    z2 = randn(*SHAPE, dtype=F64, seed=42)
    got_s = R.flow_step(xs, z - x0, t64(s), t64(sn), stochastic=True, noise=z2)
    assert max_rel_err(got_s, (1 - coln) * x0 + coln * z2) < 1e-14


# ---- LCM -------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_lcm_step_closed_form(prediction_type):
    x, m, z = (randn(*SHAPE, dtype=F64, seed=k) for k in (43, 44, 45))
    t, tp = [999, 499, 259], [759, -1, 19]

    def one(xi, mi, zi, ti, tpi, clip=None):
        ab, abp = ab_of(SCHED, ti), ab_of(SCHED, tpi)
        c_skip = 0.5**2 / ((ti * 10.0) ** 2 + 0.5**2)
        c_out = (ti * 10.0) / ((ti * 10.0) ** 2 + 0.5**2) ** 0.5
        x0 = {"epsilon": (xi - math.sqrt(1 - ab) * mi) / math.sqrt(ab), "sample": mi,
              "v_prediction": math.sqrt(ab) * xi - math.sqrt(1 - ab) * mi}[prediction_type]
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        den = c_out * x0 + c_skip * xi
        return den if tpi < 0 else math.sqrt(abp) * den + math.sqrt(1 - abp) * zi

    got = R.lcm_step(x, m, torch.tensor(t), torch.tensor(tp), schedule=SCHED, prediction_type=prediction_type, noise=z)
    assert max_rel_err(got, per_sample(one, x, m, z, t, tp)) < 1e-13
    got_c = R.lcm_step(x, m, torch.tensor(t), torch.tensor(tp), schedule=SCHED, prediction_type=prediction_type,
                       noise=z, clip_sample=0.8)
    assert max_rel_err(got_c, per_sample(lambda *a: one(*a, clip=0.8), x, m, z, t, tp)) < 1e-13


def test_lcm_step_at_t0_returns_x():
    # boundary condition: c_skip(0) = 1, c_out(0) = 0
    x, m = randn(*SHAPE, dtype=F64, seed=46), randn(*SHAPE, dtype=F64, seed=47)
    out, den = R.lcm_step(x, m, 0, -1, return_denoised=True)
    assert torch.equal(out, x) and torch.equal(den, x)


# ---- public ops vs the float64 reference: dtype x shape x strides x scalars x noise ------------
DTYPES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = {"odd": (3, 5, 7), "one-element": (1, 1), "vector": (5,)}
STRIDES = ("contiguous", "transposed", "sliced", "expanded")


def _levels_for(kind, n, seed):
    """(sigma, sigma_next, sigma_prev) per-sample lists for an op kind."""
    g = gen(seed)
    u = torch.rand(3, n, generator=g, dtype=F64)
    if kind == "flow":
        s = 0.5 + 0.45 * u[0]
        return s, s * (0.2 + 0.7 * u[1]), None
    s = 0.8 + 2.0 * u[0]
    return s, s * (0.2 + 0.7 * u[1]), s * (1.2 + u[2])


def _as_form(v, form, n):
    """A per-sample level list in one of the accepted forms."""
    if form == "float":
        return float(v[0])
    if form == "0-d":
        return v[0].clone()
    if form == "(1,)":
        return v[:1].clone()
    if form == "(B,) float32":
        return v.to(torch.float32)
    return v.clone()  # (B,) float64


def _to_oracle(v):
    return v.to(F64) if isinstance(v, torch.Tensor) else v


# (id, kind, draws, f(ops, x, m, m2, xp, old, s, sn, sp, noise, generator))
OPS = [
    ("euler", "ve", False, lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, sn)),
    ("euler-eps", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, sn, prediction_type="epsilon")),
    ("euler-v-final", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, 0.0, prediction_type="v_prediction")),
    ("euler-ancestral", "ve", True,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, sn, eta=1.0, s_noise=0.9, noise=z,
                                                               generator=g)),
    ("euler-ancestral-eps", "ve", True,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, sn, eta=0.7, noise=z, generator=g,
                                                               prediction_type="epsilon")),
    ("euler-churn-v", "ve", True,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.euler_step(x, m, s, sn, gamma=0.3, noise=z, generator=g,
                                                               prediction_type="v_prediction")),
    ("heun", "ve", False, lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.heun_step(x, m, xp, m2, s, sn)),
    ("heun-eps", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.heun_step(x, m, xp, m2, s, sn, prediction_type="epsilon")),
    ("dpmpp-1st", "ve", False, lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.dpmpp_2m_step(x, m, None, s, sn)),
    ("dpmpp-2nd", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.dpmpp_2m_step(x, m, old, s, sn, sp, return_denoised=True)),
    ("dpmpp-2nd-heun-v-vp", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.dpmpp_2m_step(
         x, m, old, s, sn, sp, prediction_type="v_prediction", solver_type="heun", variance_preserving=True)),
    ("dpmpp-eps-final", "ve", False,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.dpmpp_2m_step(x, m, old, s, 0.0, sp, prediction_type="epsilon",
                                                                  return_denoised=True)),
    ("flow", "flow", False, lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.flow_step(x, m, s, sn)),
    ("flow-stochastic", "flow", True,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.flow_step(x, m, s, sn, stochastic=True, noise=z, generator=g)),
    ("flow-q-sample", "flow", True,
     lambda o, x, m, m2, xp, old, s, sn, sp, z, g: o.flow_q_sample(x, s, z, generator=g)),
]

LCM_OPS = [
    ("lcm-eps", dict(prediction_type="epsilon")),
    ("lcm-v-final-mixed", dict(prediction_type="v_prediction", return_denoised=True)),
    ("lcm-sample-clip", dict(prediction_type="sample", clip_sample=1.5)),
]


def _make(shape, dtype, stride, seed):
    """x, m, m2, xp, old, z in dtype, in the stride class (values random, never zeros)."""
    def one(k, operand):
        full = randn(*shape, dtype=F64, seed=seed + k)
        if stride == "transposed" and len(shape) >= 2:
            return full.transpose(-1, -2).contiguous().transpose(-1, -2).to(dtype)
        if stride == "sliced":
            wide = randn(*shape[:-1], 2 * shape[-1], dtype=F64, seed=seed + k)
            return wide[..., ::2].to(dtype)
        if stride == "expanded" and operand and len(shape) >= 2:
            return full[:, :1].to(dtype).expand(shape)  # a model output broadcast along dim 1 (stride 0)
        return full.to(dtype)
    return [one(k, operand) for k, operand in enumerate((False, True, True, False, True, False))]


def _check_out(got, want, dtype, x_dtype):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == x_dtype and a.shape == b.shape
        assert max_rel_err(a, b) < DTYPES[dtype], (a.dtype, max_rel_err(a, b))


FORMS = ("float", "0-d", "(1,)", "(B,) float32", "(B,) float64")
_DT_IDS = {d: str(d).split(".")[-1] for d in DTYPES}
# every dtype x shape x stride x noise source, the scalar forms taken in turn; then every
# dtype x form on one shape
MATRIX = [pytest.param(d, sh, st, FORMS[k % len(FORMS)], nm, id=f"{_DT_IDS[d]}-{sh}-{st}-{FORMS[k % len(FORMS)]}-{nm}")
          for k, (d, sh, st, nm) in enumerate((d, sh, st, nm) for d in DTYPES for sh in SHAPES for st in STRIDES
                                              for nm in ("given", "drawn"))]
MATRIX += [pytest.param(d, "odd", "contiguous", f, "drawn", id=f"{_DT_IDS[d]}-forms-{f}") for d in DTYPES
           for f in FORMS]


@pytest.mark.parametrize("dtype, shape_id, stride, form, noise_mode", MATRIX)
def test_public_ops_match_float64_reference(dtype, shape_id, stride, form, noise_mode):
    shape = SHAPES[shape_id]
    x, m, m2, xp, old, z = _make(shape, dtype, stride, seed=100)
    x64 = [t.double() for t in (x, m, m2, xp, old, z)]
    n = shape[0]
    for name, kind, draws, f in OPS:
        if noise_mode == "drawn" and not draws:
            continue
        s, sn, sp = (None if v is None else _as_form(v, form, n) for v in _levels_for(kind, n, seed=7))
        s64, sn64, sp64 = (_to_oracle(v) for v in (s, sn, sp))
        zz, zz64 = (z, x64[5]) if noise_mode == "given" else (None, None)
        g1, g2 = (gen(11), gen(11)) if noise_mode == "drawn" else (None, None)
        got = f(dk, x, m, m2, xp, old, s, sn, sp, zz, g1)
        want = f(R, *x64[:5], s64, sn64, sp64, zz64, g2)
        try:
            _check_out(got, want, dtype, x.dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    for name, kw in LCM_OPS:
        t = {"float": 999, "0-d": torch.tensor(999), "(1,)": torch.tensor([999])}.get(form)
        t = t if t is not None else torch.tensor([999, 519, 259, 19, 1][:n])
        tp = -1 if "final" in name else (t - 240).clamp_min(-1) if isinstance(t, torch.Tensor) else 759
        zz, zz64 = (z, x64[5]) if noise_mode == "given" else (None, None)
        g1, g2 = (gen(12), gen(12)) if noise_mode == "drawn" else (None, None)
        mm, mm64 = (m.float(), x64[1]) if "mixed" in name and dtype in (torch.float16, torch.bfloat16) else (m, x64[1])
        got = dk.lcm_step(x, mm, t, tp, schedule=SCHED, noise=zz, generator=g1, **kw)
        want = R.lcm_step(x64[0], mm64, t, tp, schedule=SCHED, noise=zz64, generator=g2, **kw)
        out_dtype = torch.promote_types(x.dtype, mm.dtype)
        try:
            _check_out(got, want, dtype if out_dtype == dtype else torch.float32, out_dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


# ---- per-sample scalars equal per-sample calls ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_levels_equal_per_sample_calls(dtype):
    x, m, m2, xp, old, z = _make((B, 4, 6), dtype, "contiguous", seed=200)
    tol = 0 if not dk.native_available() else 4 * torch.finfo(dtype).eps
    for name, kind, _draws, f in OPS:
        s, sn, sp = _levels_for(kind, B, seed=9)
        got = f(dk, x, m, m2, xp, old, s, sn, sp, z, None)
        got = got if isinstance(got, tuple) else (got,)
        for i in range(B):
            sl = slice(i, i + 1)
            one = f(dk, x[sl], m[sl], m2[sl], xp[sl], old[sl], float(s[i]), float(sn[i]),
                    None if sp is None else float(sp[i]), z[sl], None)
            one = one if isinstance(one, tuple) else (one,)
            for a, b in zip(got, one, strict=True):
                assert max_rel_err(a[sl], b) <= tol, name
    t, tp = torch.tensor([999, 500, 20]), torch.tensor([759, -1, 0])
    got = dk.lcm_step(x, m, t, tp, noise=z)
    for i in range(B):
        one = dk.lcm_step(x[i:i + 1], m[i:i + 1], int(t[i]), int(tp[i]), noise=z[i:i + 1])
        assert max_rel_err(got[i:i + 1], one) <= tol


# ---- noise: drawn from the generator as the DDIM/DDPM ops draw it ------------------------------
def test_drawn_noise_is_the_philox_stream_and_advances_once_per_call():
    x, m = randn(*SHAPE, seed=300), randn(*SHAPE, seed=301)
    s, sn = 2.0, 1.2
    z = _rng.normal_like(x.shape, gen(5), x.device, torch.float32)
    drawn = dk.euler_step(x, m, s, sn, eta=1.0, generator=gen(5))
    assert max_rel_err(drawn, dk.euler_step(x, m, s, sn, eta=1.0, noise=z)) < 1e-6
    g = gen(5)
    a = dk.flow_step(x, m, 0.6, 0.3, stochastic=True, generator=g)
    b = dk.flow_step(x, m, 0.6, 0.3, stochastic=True, generator=g)
    assert not torch.allclose(a, b)  # the second call draws fresh noise
    g2 = gen(5)
    _rng.normal_like(x.shape, g2, x.device, torch.float32)  # one draw's worth
    assert max_rel_err(b, dk.flow_step(x, m, 0.6, 0.3, stochastic=True, generator=g2)) < 1e-6
    # flow_q_sample returns the noise it drew
    xt, noise = dk.flow_q_sample(x, 0.4, generator=gen(6))
    assert torch.equal(noise, _rng.normal_like(x.shape, gen(6), x.device, torch.float32))
    assert max_rel_err(xt, 0.6 * x + 0.4 * noise) < 1e-6


def test_deterministic_steps_do_not_touch_the_generator():
    x, m = randn(*SHAPE, seed=302), randn(*SHAPE, seed=303)
    g = gen(7)
    state = g.get_state()
    dk.euler_step(x, m, 2.0, 1.0, generator=g)
    dk.flow_step(x, m, 0.5, 0.2, generator=g)
    assert torch.equal(g.get_state(), state)


def test_ancestral_final_step_adds_no_noise_even_if_drawn():
    x, m = randn(*SHAPE, seed=304), randn(*SHAPE, seed=305)
    out = dk.euler_step(x, m, torch.tensor([2.0, 1.0, 0.5]), torch.tensor([0.0, 0.5, 0.0]), eta=1.0,
                        noise=torch.full(SHAPE, float("inf")))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all() and not torch.isfinite(out[1]).all()
    assert max_rel_err(out[0], m[0]) < 1e-6


def test_mixed_model_dtype_promotes():
    x = randn(*SHAPE, seed=306)
    m = randn(*SHAPE, seed=307).to(torch.float16)
    out = dk.euler_step(x, m, 2.0, 1.0)
    assert out.dtype == torch.float32
    assert max_rel_err(out, dk.euler_step(x, m.float(), 2.0, 1.0)) < 1e-7
    out16 = dk.dpmpp_2m_step(x.half(), m, m, 2.0, 1.0, 3.0)
    assert out16.dtype == torch.float16


# ---- autograd -------------------------------------------------------------------------
GRAD_CASES = [
    ("euler", lambda x, m, m2, xp, z: R.euler_step(x, m, 1.7, 0.6, prediction_type="epsilon"), 2),
    ("euler-ancestral", lambda x, m, m2, xp, z: R.euler_step(x, m, 1.7, torch.tensor([0.6, 0.0]), eta=1.0, noise=z),
     2),
    ("euler-churn", lambda x, m, m2, xp, z: R.euler_step(x, m, 1.7, 0.6, gamma=0.2, noise=z,
                                                         prediction_type="v_prediction"), 2),
    ("heun", lambda x, m, m2, xp, z: R.heun_step(x, m, xp, m2, 1.7, 0.6, prediction_type="v_prediction"), 4),
    ("dpmpp-midpoint", lambda x, m, m2, xp, z: R.dpmpp_2m_step(x, m, m2, torch.tensor([1.7, 1.0]),
                                                               torch.tensor([0.6, 0.0]), 2.5), 3),
    ("dpmpp-heun-vp", lambda x, m, m2, xp, z: R.dpmpp_2m_step(x, m, m2, 1.7, 0.6, 2.5, solver_type="heun",
                                                              variance_preserving=True,
                                                              prediction_type="epsilon"), 3),
    ("flow", lambda x, m, m2, xp, z: R.flow_step(x, m, 0.7, 0.3, stochastic=True, noise=z), 2),
    ("flow-q-sample", lambda x, m, m2, xp, z: R.flow_q_sample(x, torch.tensor([0.3, 0.8]), z)[0], 1),
    ("lcm", lambda x, m, m2, xp, z: R.lcm_step(x, m, torch.tensor([999, 300]), torch.tensor([500, -1]), noise=z), 2),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c[0])
def test_gradcheck_reference(case):
    _, f, _n = case
    ts = [randn(2, 3, dtype=F64, seed=400 + k).requires_grad_() for k in range(5)]
    assert torch.autograd.gradcheck(lambda *a: f(*a), ts, check_undefined_grad=False)


def test_public_ops_are_differentiable():
    x, m, z = (randn(*SHAPE, dtype=F64, seed=k).requires_grad_() for k in (410, 411, 412))
    out = dk.euler_step(x, m, 2.0, 1.0, eta=1.0, noise=z)
    out.sum().backward()
    d_down, d_up = get_ancestral_step(2.0, 1.0)
    for grad, want in ((x.grad, d_down / 2.0), (m.grad, 1 - d_down / 2.0), (z.grad, 0.9 * 0 + d_up)):
        assert (grad - want).abs().max() < 1e-14


# ---- the native hook ---------------------------------------------------------------------------
def test_native_hook_is_called_with_validated_args_and_may_decline(monkeypatch):
    calls = []

    def fake(x, m, sigma, sigma_next, eta, s_noise, gamma, prediction, noise, generator):
        calls.append((sigma, sigma_next, eta, prediction))
        return NotImplemented if eta > 0 else torch.full_like(x, 7.0)

    monkeypatch.setattr(sampler_ops.U.N, "euler_step", fake)  # the native side below diffkern.unchecked
    monkeypatch.setattr(sampler_ops, "_fast", lambda x, m: False)  # the road of GPU tensors and torch.compile
    x, m = randn(*SHAPE, seed=413), randn(*SHAPE, seed=414)
    assert torch.equal(dk.euler_step(x, m, torch.tensor(2.0), 1, prediction_type="epsilon"), torch.full_like(x, 7.0))
    assert calls[-1] == (2.0, 1.0, 0.0, 0)
    out = dk.euler_step(x, m, 2.0, 1.0, eta=1.0, noise=m)  # declined: the reference runs
    assert torch.equal(out, R.euler_step(x, m, 2.0, 1.0, eta=1.0, noise=m))


# ---- bad inputs ---------------------------------------------------------------------------------
X, M, Z = randn(*SHAPE, seed=500), randn(*SHAPE, seed=501), randn(*SHAPE, seed=502)
BAD = [
    ("x-list", lambda o: o.euler_step([1.0], M, 1.0, 0.5), TypeError, "x"),
    ("denoised-int", lambda o: o.euler_step(X, M.long(), 1.0, 0.5), TypeError, "denoised"),
    ("denoised-shape", lambda o: o.euler_step(X, M[:, :2, :3], 1.0, 0.5), ValueError, "denoised"),
    ("denoised-device", lambda o: o.euler_step(X, M.to("meta"), 1.0, 0.5), dk.MismatchError, "denoised"),
    ("sigma-zero", lambda o: o.euler_step(X, M, 0.0, 0.0), ValueError, "sigma"),
    ("sigma-neg-tensor", lambda o: o.euler_step(X, M, torch.tensor([1.0, -1.0, 2.0]), 0.5), ValueError, "sigma"),
    ("sigma-nan", lambda o: o.euler_step(X, M, float("nan"), 0.5), ValueError, "sigma"),
    ("sigma-inf", lambda o: o.euler_step(X, M, torch.tensor([1.0, math.inf, 2.0]), 0.5), ValueError, "sigma"),
    ("sigma-bool", lambda o: o.euler_step(X, M, True, 0.5), TypeError, "sigma"),
    ("sigma-str", lambda o: o.euler_step(X, M, "1.0", 0.5), TypeError, "sigma"),
    ("sigma-int-tensor", lambda o: o.euler_step(X, M, torch.tensor([1, 2, 3]), 0.5), TypeError, "sigma"),
    ("sigma-batch", lambda o: o.euler_step(X, M, torch.ones(4), 0.5), ValueError, "sigma"),
    ("sigma-2d", lambda o: o.euler_step(X, M, torch.ones(3, 1), 0.5), ValueError, "sigma"),
    ("sigma-device", lambda o: o.euler_step(X, M, torch.ones(3, device="meta"), 0.5), dk.MismatchError, "sigma"),
    ("sigma-next-neg", lambda o: o.euler_step(X, M, 1.0, -0.5), ValueError, "sigma_next"),
    ("ancestral-order", lambda o: o.euler_step(X, M, 1.0, 1.5, eta=1.0), ValueError, "sigma_next"),
    ("ancestral-order-tensor", lambda o: o.euler_step(X, M, torch.tensor([1.0, 2, 3]), torch.tensor([0.5, 2.5, 1]),
                                                      eta=1.0), ValueError, "sigma_next"),
    ("eta-neg", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=-0.1), ValueError, "eta"),
    ("s-noise-neg", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=1.0, s_noise=-1.0), ValueError, "s_noise"),
    ("eta-and-gamma", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=1.0, gamma=0.1), ValueError, "gamma"),
    ("prediction", lambda o: o.euler_step(X, M, 1.0, 0.5, prediction_type="eps"), ValueError, "prediction_type"),
    ("noise-shape", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=1.0, noise=Z[:, :2, :3]), ValueError, "noise"),
    ("noise-and-generator", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=1.0, noise=Z, generator=gen(1)),
     ValueError, "generator"),
    ("generator-type", lambda o: o.euler_step(X, M, 1.0, 0.5, eta=1.0, generator=1), TypeError, "generator"),
    ("heun-sigma-next-zero", lambda o: o.heun_step(X, M, X, M, 1.0, 0.0), ValueError, "sigma_next"),
    ("heun-proposal-shape", lambda o: o.heun_step(X, M, X[:1, :2], M, 1.0, 0.5), ValueError, "x_proposal"),
    ("heun-denoised-proposal", lambda o: o.heun_step(X, M, X, None, 1.0, 0.5), TypeError, "denoised_proposal"),
    ("dpm-no-sigma-prev", lambda o: o.dpmpp_2m_step(X, M, M, 1.0, 0.5), ValueError, "sigma_prev"),
    ("dpm-sigma-prev-order", lambda o: o.dpmpp_2m_step(X, M, M, 1.0, 0.5, 0.8), ValueError, "sigma_prev"),
    ("dpm-sigma-next-order", lambda o: o.dpmpp_2m_step(X, M, M, 1.0, 1.0, 2.0), ValueError, "sigma_next"),
    ("dpm-old-shape", lambda o: o.dpmpp_2m_step(X, M, M[:, :1, :2], 1.0, 0.5, 2.0), ValueError, "old_denoised"),
    ("dpm-solver", lambda o: o.dpmpp_2m_step(X, M, None, 1.0, 0.5, solver_type="bh2"), ValueError, "solver_type"),
    ("dpm-vp-type", lambda o: o.dpmpp_2m_step(X, M, None, 1.0, 0.5, variance_preserving=1), TypeError,
     "variance_preserving"),
    ("flow-sigma-nan", lambda o: o.flow_step(X, M, float("nan"), 0.5), ValueError, "sigma"),
    ("flow-velocity", lambda o: o.flow_step(X, "v", 0.5, 0.2), TypeError, "velocity"),
    ("flow-stochastic-type", lambda o: o.flow_step(X, M, 0.5, 0.2, stochastic="yes"), TypeError, "stochastic"),
    ("flow-q-sigma-above-one", lambda o: o.flow_q_sample(X, torch.tensor([0.5, 1.5, 0.2])), ValueError, "sigma"),
    ("flow-q-x0", lambda o: o.flow_q_sample(X.long(), 0.5), TypeError, "x0"),
    ("lcm-t-range", lambda o: o.lcm_step(X, M, 1000, 500), ValueError, "t"),
    ("lcm-t-float", lambda o: o.lcm_step(X, M, torch.tensor(999.0), 500), TypeError, "t"),
    ("lcm-t-prev-order", lambda o: o.lcm_step(X, M, 500, 500), ValueError, "t_prev"),
    ("lcm-sigma-data", lambda o: o.lcm_step(X, M, 500, 200, sigma_data=0.0), ValueError, "sigma_data"),
    ("lcm-schedule", lambda o: o.lcm_step(X, M, 500, 200, schedule="linear"), TypeError, "schedule"),
    ("lcm-zero-snr-eps", lambda o: o.lcm_step(X, M, 999, 500, schedule=dk.NoiseSchedule.linear(
        rescale_zero_terminal_snr=True)), ValueError, "epsilon"),
]


@pytest.mark.parametrize("impl", [dk, R], ids=["public", "reference"])
@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_inputs(case, impl):
    _, f, exc, match = case
    with pytest.raises(exc, match=match):
        f(impl)


def test_device_resident_levels_are_not_read_back():
    # A (B,) level on x's device is not range-checked on the host; with x on the CPU that
    # is the CPU, so check the rule through the helper itself.
    from diffkern import _validate as V

    meta = torch.ones(3, device="meta")
    assert V.host_levels(meta, X) is None
    V.check_level_order(torch.full((3,), 5.0, device="meta"), 1.0, X, "never raised")


def test_public_and_reference_signatures_agree():
    import inspect

    for name in ("euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step"):
        assert inspect.signature(getattr(dk, name)) == inspect.signature(getattr(R, name)), name
        assert name in dk.__all__ and name in R.__all__


# ---- the public ops against diffusers' own schedulers, step by step -------------------------
def _diffusers_model(x, t):
    """A deterministic nonlinear stand-in for a network (depends on x and the timestep)."""
    return torch.tanh(x * 0.3 + float(t) / 1000.0) * 0.9 + 0.05 * x


def _scheduler_cfg(**kw):
    return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("s_churn", [0.0, 3.0])
def test_euler_step_is_diffusers_euler_discrete_step(prediction_type, s_churn):
    """EulerDiscreteScheduler.step (float32, its own sigmas, churn noise from its generator)
    equals euler_step(gamma=diffusers' gamma, noise=the same draw) on every step."""
    from diffusers import EulerDiscreteScheduler

    sch = EulerDiscreteScheduler(**_scheduler_cfg(prediction_type=prediction_type))
    sch.set_timesteps(8)
    x = randn(*SHAPE, seed=60) * float(sch.init_noise_sigma)
    n_churned = 0
    for i, t in enumerate(sch.timesteps):
        m = _diffusers_model(sch.scale_model_input(x, t), t)
        want = sch.step(m, t, x, s_churn=s_churn, s_tmin=0.2, s_tmax=10.0, s_noise=1.01, generator=gen(i)).prev_sample
        gamma = min(s_churn / (len(sch.sigmas) - 1), 2**0.5 - 1) if 0.2 <= sch.sigmas[i] <= 10.0 else 0.0
        z = torch.randn(SHAPE, generator=gen(i)) if gamma > 0 else None
        n_churned += gamma > 0
        got = dk.euler_step(x, m, sch.sigmas[i], sch.sigmas[i + 1], gamma=gamma, s_noise=1.01,
                            prediction_type=prediction_type, noise=z)
        assert got.dtype == want.dtype and max_rel_err(got, want) <= 1e-5, i
        x = want
    assert (n_churned == 0) == (s_churn == 0) and n_churned < len(sch.timesteps)  # churn inside the window only


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # diffusers has no "sample" here
def test_euler_ancestral_step_is_diffusers_euler_ancestral_step(prediction_type):
    from diffusers import EulerAncestralDiscreteScheduler

    sch = EulerAncestralDiscreteScheduler(**_scheduler_cfg(prediction_type=prediction_type))
    sch.set_timesteps(8)
    x = randn(*SHAPE, seed=61) * float(sch.init_noise_sigma)
    for i, t in enumerate(sch.timesteps):
        m = _diffusers_model(sch.scale_model_input(x, t), t)
        want = sch.step(m, t, x, generator=gen(i)).prev_sample
        got = dk.euler_step(x, m, sch.sigmas[i], sch.sigmas[i + 1], eta=1.0, prediction_type=prediction_type,
                            noise=torch.randn(SHAPE, generator=gen(i)))
        assert max_rel_err(got, want) <= 1e-5, i
        x = want


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_heun_steps_are_diffusers_heun_discrete(prediction_type):
    """HeunDiscreteScheduler's two calls per level (sigmas s0, s1, s1, ..., 0) equal
    euler_step then heun_step; its last level is one Euler step to 0."""
    from diffusers import HeunDiscreteScheduler

    sch = HeunDiscreteScheduler(**_scheduler_cfg(prediction_type=prediction_type))
    sch.set_timesteps(6)
    x = randn(*SHAPE, seed=62) * float(sch.init_noise_sigma)
    ts, sig = sch.timesteps, sch.sigmas
    for j, t in enumerate(ts):
        first = j % 2 == 0
        m = _diffusers_model(sch.scale_model_input(x, t), t)
        if first:
            x_level, m_level, s, sn = x, m, sig[j], sig[j + 1]
        want = sch.step(m, t, x).prev_sample
        if first:
            got = dk.euler_step(x, m, s, sn, prediction_type=prediction_type)
        else:  # x is the first stage's proposal at sn
            got = dk.heun_step(x_level, m_level, x, m, s, sn, prediction_type=prediction_type)
        assert max_rel_err(got, want) <= 1e-5, j
        x = want


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_step_is_diffusers_dpm_solver_multistep_step(prediction_type, solver_type):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2, its default final step to sigma 0)
    equals dpmpp_2m_step(variance_preserving=True) chained through return_denoised."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(**_scheduler_cfg(prediction_type=prediction_type, solver_type=solver_type))
    sch.set_timesteps(7)
    x, old = randn(*SHAPE, seed=63), None
    for i, t in enumerate(sch.timesteps):
        m = _diffusers_model(x, t)
        want = sch.step(m, t, x).prev_sample
        got, den = dk.dpmpp_2m_step(x, m, old, sch.sigmas[i], sch.sigmas[i + 1],
                                    sch.sigmas[i - 1] if old is not None else None, prediction_type=prediction_type,
                                    solver_type=solver_type, variance_preserving=True, return_denoised=True)
        assert max_rel_err(got, want) <= 1e-5, i
        x, old = want, den
    assert float(sch.sigmas[-1]) == 0.0
