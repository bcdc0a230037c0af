"""linear_step (csrc/kernels/linear_step.h LinearOp): the multistep solvers' fused update
``out_k = sum_j c[k][j] in_j + cn[k] z``, native against the reference
(reference_samplers._linear) and against the formula written out in float64.

The kernel and the reference sum the same products in the same order (left to right, the
noise term last, no contraction: the CPU build has -ffp-contract=off), so float64 and
float32 agree bitwise; half storage is computed in float32 and rounded once by both.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen, needs_cuda, needs_native, randn

import diffkern as dk
from diffkern import sampler_ops

F64 = torch.float64
R = dk.reference
native_linear = pytest.mark.skipif(
    not dk.native_available() or not hasattr(torch.ops.diffkern, "linear_step"), reason="no native linear_step")


def _formula(inputs, c, cn=None, z=None):
    """The combination in float64, with c a (B|1, K, J) and cn a (B|1, K) float64 tensor."""
    x = inputs[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    outs = []
    for k in range(c.shape[1]):
        acc = sum(c[:, k, j].reshape(shape) * t.double() for j, t in enumerate(inputs))
        if z is not None:
            cz = cn[:, k].reshape(shape)
            acc = torch.where(cz != 0, acc + cz * z.double(), acc)
        outs.append(acc.expand(x.shape))
    return outs


def _inputs(J, shape, dtype, seed, *, broadcast=False):
    ins = [randn(*shape, dtype=dtype, seed=seed)]
    for j in range(1, J):
        s = (1, *shape[1:]) if broadcast and j == J - 1 else shape
        ins.append(randn(*s, dtype=dtype, seed=seed + j))
    return ins


def _coeffs(K, J, seed, B=None):
    g = gen(seed)
    c = torch.randn((B or 1, K, J), dtype=F64, generator=g)
    return c


@pytest.mark.parametrize("J", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_reference_is_the_formula(J, K):
    ins = _inputs(J, (3, 5, 7), F64, 10 * J + K)
    c = _coeffs(K, J, J + K, B=3)
    got = R.linear_step(ins, c)
    for g, w in zip(got, _formula(ins, c), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)
    host = tuple(tuple(float(v) for v in row) for row in c[0])
    for g, w in zip(R.linear_step(ins, host), _formula(ins, c[:1]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-14)


@native_linear
@needs_native
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("J,K", [(1, 1), (2, 2), (3, 1), (4, 2), (5, 3), (6, 3)])
def test_native_equals_reference(J, K, dtype, per_sample):
    shape = (3, 5, 37)  # odd inner size: vector bodies and scalar tails
    ins = _inputs(J, shape, dtype, 100 * J + K, broadcast=J > 2)
    c = _coeffs(K, J, 7 * J + K, B=3 if per_sample else None)
    coeffs = c if per_sample else tuple(tuple(float(v) for v in row) for row in c[0])
    got = dk.linear_step(ins, coeffs)
    ref = R.linear_step(ins, coeffs)
    assert len(got) == K
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == dtype and g.shape == shape
        assert torch.equal(g, r), (g - r).abs().max()
    if dtype == F64:
        for g, w in zip(got, _formula(ins, c), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


@native_linear
@needs_native
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_noncontiguous_and_channels_last(dtype):
    base = [randn(3, 7, 6, 5, dtype=dtype, seed=s) for s in range(4)]
    ins = [base[0].transpose(1, 3), base[1].transpose(1, 3), base[2][:, :, :, :].transpose(1, 3)[..., ::1],
           base[3].transpose(1, 3)]
    assert not ins[0].is_contiguous()
    c = _coeffs(2, 4, 5, B=3)
    got = dk.linear_step(ins, c)
    for g, r in zip(got, R.linear_step(ins, c), strict=True):
        assert torch.equal(g, r)
    cl = randn(2, 3, 4, 5, dtype=dtype, seed=9).contiguous(memory_format=torch.channels_last)
    (o,) = dk.linear_step([cl, cl * 2], [[0.5, -1.25]])
    assert o.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(o, R.linear_step([cl, cl * 2], [[0.5, -1.25]])[0])


@native_linear
@needs_native
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_noise_given_drawn_and_keyed(dtype):
    ins = _inputs(3, (4, 3, 33), dtype, 31)
    c = _coeffs(2, 3, 32, B=4)
    cn = torch.tensor([[0.5, 0.0], [0.0, 0.0], [1.5, -2.0], [0.25, 1.0]], dtype=F64)
    z = randn(4, 3, 33, dtype=dtype, seed=33)
    got = dk.linear_step(ins, c, noise_coeffs=cn, noise=z)
    for g, w in zip(got, _formula(ins, c, cn, z), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-13 if dtype == F64 else 1e-6, atol=1e-12 if dtype == F64
                                   else 1e-5)
    # drawn: the reference draws the same Philox stream from the same generator
    a = dk.linear_step(ins, c, noise_coeffs=cn, generator=gen(5))
    b = R.linear_step(ins, c, noise_coeffs=cn, generator=gen(5))
    for g, r in zip(a, b, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=2e-6 * 4)
    assert not torch.equal(a[0], dk.linear_step(ins, c, noise_coeffs=cn, generator=gen(6))[0])
    # keyed: sample b depends on (seeds[b], step) only, so it is batch-invariant
    seeds = torch.tensor([11, 12, 13, 14])
    full = dk.linear_step(ins, c, noise_coeffs=cn, seeds=seeds, step=3)
    one = dk.linear_step([t[2:3] for t in ins], c[2:3], noise_coeffs=cn[2:3], seeds=seeds[2:3], step=3)
    for f, o in zip(full, one, strict=True):
        torch.testing.assert_close(f[2:3], o, rtol=0, atol=0)


@native_linear
@needs_native
def test_zero_noise_coefficient_takes_no_noise():
    x = randn(2, 9, seed=1)
    z = torch.full_like(x, float("inf"))
    (o,) = dk.linear_step([x], [[1.0]], noise_coeffs=[0.0], noise=z)
    assert torch.equal(o, x)
    (o,) = dk.linear_step([x], torch.ones(2, 1, 1, dtype=F64), noise_coeffs=torch.tensor([[0.0], [1.0]], dtype=F64),
                          noise=z)
    assert torch.equal(o[0], x[0]) and bool(torch.isinf(o[1]).all())


@native_linear
@needs_native
def test_the_native_path_runs(monkeypatch):
    called = []
    monkeypatch.setattr(sampler_ops.R, "_linear", lambda *a: called.append(1))
    x = randn(2, 3, seed=2)
    (o,) = dk.linear_step([x, x], [[1.0, 2.0]])
    assert not called and torch.equal(o, 3 * x)


def test_outputs_are_new_tensors_and_errors():
    x = randn(2, 3, seed=3)
    (o,) = dk.linear_step([x], [[1.0]])
    assert o is not x and torch.equal(o, x)
    o.add_(1)
    assert not torch.equal(o, x)
    with pytest.raises(ValueError, match="one coefficient per input"):
        dk.linear_step([x, x], [[1.0]])
    with pytest.raises(ValueError, match="1 to 6 inputs"):
        dk.linear_step([x] * 7, [[1.0] * 7])
    with pytest.raises(ValueError, match="1 to 3 rows"):
        dk.linear_step([x], [[1.0]] * 4)
    with pytest.raises(ValueError, match="finite"):
        dk.linear_step([x], [[float("nan")]])
    with pytest.raises(ValueError, match="noise_coeffs"):
        dk.linear_step([x], [[1.0]], noise=x)
    with pytest.raises(ValueError, match="batch axis"):
        dk.linear_step([x], torch.ones(5, 1, 1, dtype=F64))
    with pytest.raises(ValueError, match="broadcast"):
        dk.linear_step([x, randn(4, 3, seed=1)], [[1.0, 1.0]])


@native_linear
@needs_native
def test_gradients():
    x, m, h = (randn(3, 4, dtype=F64, seed=40 + i).requires_grad_(True) for i in range(3))
    hb = randn(1, 4, dtype=F64, seed=44).requires_grad_(True)
    c = _coeffs(2, 4, 41, B=3)
    torch.autograd.gradcheck(lambda *t: dk.linear_step(list(t), c), (x, m, h, hb))
    host = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
    z = randn(3, 4, dtype=F64, seed=45).requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b, zz: dk.linear_step([a, b, h], host, noise_coeffs=[0.5, 0.0], noise=zz),
                             (x, m, z))


@native_linear
@needs_native
def test_opcheck():
    x, m, h = (randn(3, 5, dtype=F64, seed=50 + i) for i in range(3))
    ops = torch.ops.diffkern
    tab = torch.randn(3, 2 * 4, dtype=F64)
    cases = [
        ([x, m, h], [1.0, 2.0, 3.0, 0.0, -1.0, 0.5, 0.25, 0.0], None, 2, False, None, None, 0, 0),
        ([x, m, h], [], tab, 2, True, h.clone(), None, 0, 0),
        ([x], [1.0, 0.5], None, 1, True, None, None, 7, 9),
    ]
    for args in cases:
        args = ([t.detach().requires_grad_(True) for t in args[0]], *args[1:])
        torch.library.opcheck(ops.linear_step.default, args)


# ---- CUDA (run by scripts/gpu_check.sh; skipped without a device) --------------------------
@needs_cuda
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("J,K", [(1, 1), (3, 2), (5, 3), (6, 3)])
def test_cuda_equals_reference(J, K, dtype, per_sample):
    """nvcc contracts a * b + c into an FMA, so the kernel rounds differently from the
    reference's separate products: float64 to 1e-13, float32 to a few ulp of the largest
    term, half storage to one ulp of its own."""
    dev = torch.device("cuda")
    shape = (3, 5, 37)
    ins = [t.to(dev) for t in _inputs(J, shape, dtype, 300 * J + K, broadcast=J > 2)]
    c = _coeffs(K, J, 9 * J + K, B=3 if per_sample else None)
    coeffs = c.to(dev) if per_sample else tuple(tuple(float(v) for v in row) for row in c[0])
    got = dk.linear_step(ins, coeffs)
    want = _formula(ins, c.to(dev))
    scale = max(float(t.double().abs().max()) for t in ins) * float(c.abs().sum(2).max())
    tol = {F64: 1e-13, torch.float32: 4e-7, torch.bfloat16: 1e-2}[dtype] * scale
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cuda" and g.dtype == dtype
        assert float((g.double() - w).abs().max()) <= tol
    z = torch.randn(shape, dtype=dtype, device=dev)
    cn = [0.5] * K
    a = dk.linear_step(ins, coeffs, noise_coeffs=cn, generator=torch.Generator(dev).manual_seed(3))
    b = dk.linear_step(ins, coeffs, noise_coeffs=cn, generator=torch.Generator(dev).manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    given = dk.linear_step(ins, coeffs, noise_coeffs=cn, noise=z)
    for g, w in zip(given, _formula(ins, c.to(dev), torch.tensor([cn], dtype=F64, device=dev), z), strict=True):
        assert float((g.double() - w).abs().max()) <= 2 * tol + 1e-2 * (dtype == torch.bfloat16)
