"""Issue 20's listed failures, for every sampler-family op (linear_step included) and on
every path: the native ops, the public functions falling back to the reference (no
native impl) and the reference functions themselves.

- a zero batch with (0,) levels or per-sample tables gives empty outputs;
- given noise that the step uses promotes the result as torch does (q_sample, ddim_step);
- no returned tensor is, or views, an input, and returned tensors have x's shape;
- outputs have x's layout (channels_last kept) whatever the other operands' layouts.

tests/test_family_edges.py holds the first round of these (all operands in one layout).
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen, needs_native, randn

import diffkern as dk
from diffkern import unchecked
from diffkern._validate import output_format

R = dk.reference
CL = torch.channels_last


@pytest.fixture(params=[pytest.param("native", marks=needs_native), "fallback", "reference"])
def ops(request, monkeypatch):
    """The module whose functions a test calls: ``fallback`` is the public face with no
    native kernels below it (what DIFFKERN_DISABLE_NATIVE=1 or a device without kernels
    gives)."""
    if request.param == "reference":
        return R
    if request.param == "fallback":
        monkeypatch.setattr(unchecked, "_native_for", lambda x: False)
    return dk


def _levels(b, lo, hi, seed):
    return lo + (hi - lo) * torch.rand(b, generator=gen(seed), dtype=torch.float64)


def _calls(b):
    """op -> call(o, x, m, z) -> tuple of outputs, per-sample levels of batch b; a noisy
    op uses z, or draws when z is None."""
    s, sn, sp = _levels(b, 1.0, 2.0, 11), _levels(b, 0.2, 0.5, 12), _levels(b, 3.0, 4.0, 13)
    f, fn = _levels(b, 0.5, 0.9, 14), _levels(b, 0.1, 0.4, 15)
    t, tp = torch.arange(700, 700 + b), torch.arange(300, 300 + b)
    table = torch.stack((_levels(b, 0.5, 1.5, 16), _levels(b, -1.0, 1.0, 17)), dim=1)[:, None, :]  # (B, 1, 2)
    ntable = torch.cat((_levels(b, 0.1, 0.5, 18)[:, None], torch.zeros(b, 1, dtype=torch.float64)), dim=1)

    def nz(z, seed):
        return dict(noise=z) if z is not None else dict(generator=gen(seed))

    def tup(r):
        return r if isinstance(r, tuple) else (r,)

    calls = {
        "euler": lambda o, x, m, z: o.euler_step(x, m, s, sn, prediction_type="epsilon"),
        "euler_ancestral": lambda o, x, m, z: o.euler_step(x, m, s, sn, eta=1.0, **nz(z, 1)),
        "euler_churn": lambda o, x, m, z: o.euler_step(x, m, s, sn, gamma=0.4, prediction_type="v_prediction",
                                                       **nz(z, 1)),
        "heun": lambda o, x, m, z: o.heun_step(x, m, x * 0.9, m * 1.1, s, sn, prediction_type="v_prediction"),
        "dpmpp_2m": lambda o, x, m, z: o.dpmpp_2m_step(x, m, m * 0.8, s, sn, sp, solver_type="heun"),
        "dpmpp_2m_denoised": lambda o, x, m, z: o.dpmpp_2m_step(x, m, None, s, sn, prediction_type="sample",
                                                                return_denoised=True),
        "dpmpp_2m_vp_denoised": lambda o, x, m, z: o.dpmpp_2m_step(x, m, m * 0.5, s, sn, sp,
                                                                   prediction_type="sample",
                                                                   variance_preserving=True, return_denoised=True),
        "flow": lambda o, x, m, z: o.flow_step(x, m, f, fn),
        "flow_stochastic": lambda o, x, m, z: o.flow_step(x, m, f, fn, stochastic=True, **nz(z, 2)),
        "flow_q_sample": lambda o, x, m, z: o.flow_q_sample(x, f, z, **({} if z is not None else
                                                                        dict(generator=gen(3)))),
        "lcm": lambda o, x, m, z: o.lcm_step(x, m, t, tp, **nz(z, 4)),
        "lcm_denoised": lambda o, x, m, z: o.lcm_step(x, m, t, tp, prediction_type="sample", return_denoised=True,
                                                      **nz(z, 4)),
        "linear": lambda o, x, m, z: o.linear_step([x, m], [[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]]),
        "linear_noisy": lambda o, x, m, z: o.linear_step([x, m], [[1.0, 0.0], [0.3, 0.7]], noise_coeffs=[0.0, 0.5],
                                                         **nz(z, 5)),
        "linear_table": lambda o, x, m, z: o.linear_step([x, m], table),
        "linear_table_noisy": lambda o, x, m, z: o.linear_step([x, m], [[0.5, 0.5]], noise_coeffs=ntable[:, :1],
                                                               **nz(z, 6)),
    }
    def as_tuple(c):
        return lambda o, x, m, z: tup(c(o, x, m, z))

    return {k: as_tuple(c) for k, c in calls.items()}


NAMES = list(_calls(1))
# the ops whose result uses given noise (euler only with eta > 0 or gamma > 0)
NOISY = ["euler_ancestral", "euler_churn", "flow_stochastic", "flow_q_sample", "lcm", "lcm_denoised",
         "linear_noisy", "linear_table_noisy"]


def _returned_noise(name, i, z):
    """flow_q_sample hands back the noise it used: the caller's own tensor when given
    (q_sample's contract), not a result of the op."""
    return name == "flow_q_sample" and i == 1 and z is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_zero_batch(ops, name, dtype):
    """(0,) levels and (0, K, J) coefficient tables: empty outputs of x's shape and dtype,
    noise given or drawn. The native linear_step broadcast a (0, ...) table against its
    zero noise table as if 1 were the larger size."""
    x = torch.empty(0, 4, 3, 5, dtype=dtype)
    for z in (None, torch.empty_like(x)):
        outs = _calls(0)[name](ops, x, torch.empty_like(x), z)
        for out in outs:
            assert out.shape == x.shape and out.dtype == dtype, (name, out.shape, out.dtype)


@pytest.mark.parametrize("xd, zd", [(torch.bfloat16, torch.float32), (torch.float16, torch.float64)])
@pytest.mark.parametrize("name", NOISY)
def test_given_noise_promotes(ops, name, xd, zd):
    """bf16 x and m with fp32 noise give fp32 (fp16 with fp64: fp64), as ``x + sigma z`` and
    q_sample/ddim_step do; the numbers are those of the call on the operands cast up
    (exact), and of the reference (float64: to 1e-13)."""
    call = _calls(3)[name]
    x, m = randn(3, 4, 5, seed=1).to(xd), randn(3, 4, 5, seed=2).to(xd)
    z = randn(3, 4, 5, seed=3, dtype=zd)
    outs = call(ops, x, m, z)
    up = call(ops, x.to(zd), m.to(zd), z)
    ref = call(R, x.to(zd), m.to(zd), z)
    for i, (got, want, r) in enumerate(zip(outs, up, ref, strict=True)):
        if _returned_noise(name, i, z):
            assert got is z
            continue
        assert got.dtype == zd, (name, i, got.dtype)
        assert torch.equal(got, want), (name, i)
        if zd == torch.float64:
            torch.testing.assert_close(got, r, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["euler", "flow"])
def test_ignored_noise_does_not_promote(ops, name):
    """A deterministic step ignores noise=, and its dtype with it."""
    x, m, z = randn(2, 3, seed=1).bfloat16(), randn(2, 3, seed=2).bfloat16(), randn(2, 3, seed=3)
    s, sn = torch.tensor([1.5, 1.2], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    out = ops.euler_step(x, m, s, sn, noise=z) if name == "euler" else ops.flow_step(x, m, s / 2, sn / 2, noise=z)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_no_output_aliases_an_input(ops, name, dtype):
    """Every returned tensor has x's shape and storage of its own, so an in-place edit of a
    result leaves every input alone; also with a model output that broadcasts (with
    ``sample`` prediction D is m: the reference handed back m's own (3, 4, 5) tensor)."""
    call = _calls(2)[name]
    x = randn(2, 3, 4, 5, seed=1, dtype=dtype)
    for m in (randn(2, 3, 4, 5, seed=2, dtype=dtype), randn(3, 4, 5, seed=2, dtype=dtype),
              randn(1, 3, 4, 5, seed=2, dtype=dtype)):
        z = randn(2, 3, 4, 5, seed=3, dtype=dtype)
        inputs = (x, m, z)
        kept = [t.clone() for t in inputs]
        outs = call(ops, x, m, z)
        for i, out in enumerate(outs):
            if _returned_noise(name, i, z):
                continue
            assert out.shape == x.shape, (name, i, tuple(m.shape), tuple(out.shape))
            for t in inputs:
                assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), (name, i)
            out.add_(1.0)
        for t, k in zip(inputs, kept, strict=True):
            assert torch.equal(t, k), name
    # the broadcast model output's D is m itself, at x's shape; with a batch of one that
    # expanded view of m is contiguous, and still must not be handed back
    if name == "dpmpp_2m_denoised":
        m = randn(3, 4, 5, seed=2, dtype=dtype)
        assert torch.equal(call(ops, x, m, None)[1], m.expand_as(x))
        x1, kept = x[:1].clone(), m.clone()
        den = _calls(1)[name](ops, x1, m, None)[1]
        assert den.shape == x1.shape and den.untyped_storage().data_ptr() != m.untyped_storage().data_ptr()
        den.add_(1.0)
        assert torch.equal(m, kept)


_LAYOUTS = [
    pytest.param(CL, torch.contiguous_format, (2, 3, 4, 5), id="x_cl-m_contig"),
    pytest.param(torch.contiguous_format, CL, (2, 3, 4, 5), id="x_contig-m_cl"),
    pytest.param(CL, CL, (1, 3, 4, 5), id="x_cl-m_cl_broadcast"),
    pytest.param(CL, torch.contiguous_format, (3, 1, 5), id="x_cl-m_broadcast"),
    pytest.param(torch.channels_last_3d, torch.contiguous_format, (2, 3, 2, 4, 5), id="x_cl3d-m_contig"),
    pytest.param(torch.channels_last_3d, torch.channels_last_3d, (2, 3, 2, 4, 5), id="x_cl3d-m_cl3d"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("xf, mf, mshape", _LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_outputs_take_x_layout(ops, name, xf, mf, mshape, dtype):
    """Outputs (flow_q_sample's drawn noise included) are channels_last(_3d) when x is,
    contiguous otherwise, whatever the layouts of the model output and the noise, with the
    numbers of the all-contiguous call (drawn noise follows the logical index). The
    reference followed torch's elementwise layout rules, which take the operands' layouts
    into account."""
    xshape = (2, 3, 2, 4, 5) if xf == torch.channels_last_3d else (2, 3, 4, 5)
    x = randn(*xshape, seed=1, dtype=dtype).contiguous(memory_format=xf)
    m = randn(*mshape, seed=2, dtype=dtype)
    if m.dim() == x.dim():
        m = m.contiguous(memory_format=mf)
    want_fmt = output_format(x)
    assert (want_fmt == torch.contiguous_format) == (xf == torch.contiguous_format)
    call = _calls(2)[name]
    for zf in (CL, torch.contiguous_format, None):
        z = None if zf is None else randn(*xshape, seed=3, dtype=dtype)
        if z is not None:
            z = z.contiguous(memory_format=zf if z.dim() == 4 or zf != CL else torch.channels_last_3d)
        outs = call(ops, x, m, z)
        want = call(ops, x.contiguous(), m.contiguous(), None if z is None else z.contiguous())
        for i, (got, w) in enumerate(zip(outs, want, strict=True)):
            if _returned_noise(name, i, z):
                continue
            assert got.is_contiguous(memory_format=want_fmt), (name, i, zf, got.stride())
            assert torch.equal(got, w), (name, i, zf)


_OLD_OPS = {
    "ddim_step": lambda x, m, z, g: dk.ddim_step(x, m, torch.tensor([700, 650]), 0.7, t_prev=torch.tensor([500, 20]),
                                                 noise=z, generator=g),
    "ddpm_step": lambda x, m, z, g: dk.ddpm_step(x, m, torch.tensor([700, 3]), noise=z, generator=g),
    "q_sample": lambda x, m, z, g: dk.q_sample(x, torch.tensor([700, 3]), z, generator=g),
    "langevin_step": lambda x, m, z, g: dk.langevin_step(x, m, 0.01, noise=z, generator=g),
}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("fmt", [CL, torch.channels_last_3d])
@pytest.mark.parametrize("name", list(_OLD_OPS))
def test_front_door_ops_in_memory_order(name, fmt, dtype):
    """The CPU driver runs a channels_last x with no noise to draw in memory order (the
    permuted views are dense); it shares that driver with the front-door ops. Results
    equal the contiguous call's, with per-sample coefficients, in x's layout, with the
    model output and noise in x's layout or not, and with noise drawn (logical order)."""
    shape = (2, 3, 4, 5) if fmt == CL else (2, 3, 2, 4, 5)
    x = randn(*shape, seed=1, dtype=dtype).contiguous(memory_format=fmt)
    for m in (randn(*shape, seed=2, dtype=dtype).contiguous(memory_format=fmt), randn(*shape, seed=2, dtype=dtype)):
        for z in (randn(*shape, seed=3, dtype=dtype).contiguous(memory_format=fmt), randn(*shape, seed=3, dtype=dtype),
                  None):
            got = _OLD_OPS[name](x, m, z, None if z is not None else gen(7))
            want = _OLD_OPS[name](x.contiguous(), m.contiguous(), None if z is None else z.contiguous(),
                                  None if z is not None else gen(7))
            got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
            assert got.is_contiguous(memory_format=fmt) and not got.is_contiguous()
            assert torch.equal(got, want), (name, z is None)
