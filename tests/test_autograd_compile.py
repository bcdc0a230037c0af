"""torch.library.opcheck of every native op, gradcheck of the differentiable ops (float64),
and torch.compile(fullgraph=True) of a DDIM loop."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, needs_native, randn

import diffkern as dk

pytestmark = needs_native
F64 = torch.float64
SCHED = dk.NoiseSchedule.linear()
TABLE = SCHED.table("cpu")


def _op(name):
    return getattr(torch.ops.diffkern, name).default


def _t_prev_optional(name) -> bool:
    """Whether the op's schema takes ``Tensor? t_prev`` (absent meaning t - 1)."""
    arg = next(a for a in _op(name)._schema.arguments if a.name == "t_prev")
    return "Optional" in str(arg.type) or str(arg.type).endswith("?")


def _rg(*shape, seed, dtype=torch.float32, grad=False):
    return randn(*shape, dtype=dtype, seed=seed).requires_grad_(grad)


# ---- opcheck -------------------------------------------------------------------------
def _step_cases(kind):
    """(id, args) for ddim_step (kind 0: 6th arg eta) / ddpm_step (kind 1: variance)."""
    t1, tp1 = torch.tensor([600]), torch.tensor([580])
    tps, tpps = torch.tensor([999, 10, 1]), torch.tensor([979, -1, 0])
    cases = []
    for grad in (False, True):
        x, m = _rg(3, 4, 5, seed=1, grad=grad), _rg(3, 4, 5, seed=2, grad=grad)
        z = _rg(3, 4, 5, seed=3, grad=grad)
        a = 0.0 if kind == 0 else 0
        cases += [
            (f"det-{grad}", (x, m, t1, tp1, TABLE, a, 0, 0.0, None, None, 0, 0)),
            (f"noise-ps-clip-{grad}", (x, m, tps, tpps, TABLE, 0.7 if kind == 0 else 1, 2, 1.0, z, None, 0, 0)),
            (f"drawn-sample-{grad}", (x, m, t1, tp1, TABLE, 1.0 if kind == 0 else 0, 1, 0.0, None, None, 1234, 8)),
            (f"bcast-{grad}", (x, _rg(1, 4, 5, seed=4, grad=grad), t1, tp1, TABLE, 0.3 if kind == 0 else 0, 0, 0.0,
                               _rg(4, 5, seed=5, grad=grad), None, 0, 0)),
        ]
    return cases


@pytest.mark.parametrize("name,kind", [("ddim_step", 0), ("ddpm_step", 1)])
def test_opcheck_step_ops(name, kind):
    for _cid, args in _step_cases(kind):
        torch.library.opcheck(_op(name), args)
    if _t_prev_optional(name):  # t_prev absent means t - 1
        x, m = _rg(3, 4, seed=6, grad=True), _rg(3, 4, seed=7, grad=True)
        torch.library.opcheck(_op(name), (x, m, torch.tensor([5, 6, 7]), None, TABLE, 0.5 if kind == 0 else 0, 0,
                                          0.0, None, None, 3, 4))


def test_opcheck_q_sample():
    for grad in (False, True):
        x0, z = _rg(3, 4, 5, seed=8, grad=grad), _rg(3, 4, 5, seed=9, grad=grad)
        torch.library.opcheck(_op("q_sample"), (x0, torch.tensor([1, 500, 999]), TABLE, z, None, 0, 0))
        torch.library.opcheck(_op("q_sample"), (x0, torch.tensor([77]), TABLE, None, None, 42, 4))
        torch.library.opcheck(_op("q_sample"), (x0, torch.tensor([77]), TABLE, _rg(5, seed=10, grad=grad), None, 0,
                                                0))


def test_opcheck_langevin_step():
    for grad in (False, True):
        x, s = _rg(6, 7, seed=11, grad=grad), _rg(6, 7, seed=12, grad=grad)
        torch.library.opcheck(_op("langevin_step"), (x, s, 0.01, _rg(6, 7, seed=13, grad=grad), None, 0, 0))
        torch.library.opcheck(_op("langevin_step"), (x, s, 0.01, None, None, 99, 12))
        torch.library.opcheck(_op("langevin_step"), (x, _rg(7, seed=14, grad=grad), 0.2, None, None, 1, 0))


def test_opcheck_step_backward():
    x, m = randn(3, 4, 5, seed=15), randn(3, 4, 5, seed=16)
    g = randn(3, 4, 5, seed=17)
    tps, tpps = torch.tensor([999, 10, 1]), torch.tensor([979, -1, 0])
    for kind in (0, 1):
        for noise_grad in (False, True):
            for clip in (0.0, 1.0):
                torch.library.opcheck(_op("step_backward"),
                                      (g, x, m, tps, tpps, TABLE, kind, 0.5, kind, 2, clip, noise_grad))
    torch.library.opcheck(_op("step_backward"),
                          (g, x, randn(1, 4, 5, seed=18), torch.tensor([300]), torch.tensor([299]), TABLE, 0, 0.0, 0,
                           0, 0.0, False))


def test_opcheck_gmm_annealed_langevin():
    for dtype in (torch.float32, F64):
        x = randn(50, 2, dtype=dtype, seed=19, scale=4.0)
        w = torch.tensor([0.8, 0.2], dtype=dtype)
        mu = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], dtype=dtype)
        sd = torch.tensor([[1.0, 1.5], [0.7, 1.0]], dtype=dtype)
        sig = torch.tensor([5.0, 2.0, 1.0], dtype=F64)
        torch.library.opcheck(_op("gmm_annealed_langevin"), (x, w, mu, sd, sig, 3, 0.1, False, None, 7, 0))
        torch.library.opcheck(_op("gmm_annealed_langevin"), (x, w, mu, sd, sig, 2, 0.05, True, None, 7, 8))


# ---- gradcheck -----------------------------------------------------------------------
def _gc(f, *inputs):
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


STEP_T = [
    pytest.param(640, 600, id="scalar-t"),
    pytest.param(torch.tensor([999, 300, 1]), torch.tensor([979, -1, 0]), id="per-sample-t"),
]


@pytest.mark.parametrize("t,t_prev", STEP_T)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_gradcheck_ddim_step(t, t_prev, clip, prediction_type, eta):
    x, m, z = (_rg(3, 2, 4, seed=s, dtype=F64, grad=True) for s in (20, 21, 22))

    def f(x, m, z, ops=dk):
        return ops.ddim_step(x, m, t, eta, t_prev=t_prev, prediction_type=prediction_type, clip_sample=clip,
                             noise=z)

    if eta > 0:
        _gc(f, x, m, z)
    else:
        _gc(lambda x, m: f(x, m, None), x, m)
    _compare_with_reference_grads(f, x, m, z if eta > 0 else None)


@pytest.mark.parametrize("t,t_prev", STEP_T)
@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_gradcheck_ddpm_step(t, t_prev, clip, prediction_type, variance):
    x, m, z = (_rg(3, 2, 4, seed=s, dtype=F64, grad=True) for s in (23, 24, 25))

    def f(x, m, z, ops=dk):
        return ops.ddpm_step(x, m, t, t_prev=t_prev, variance=variance, prediction_type=prediction_type,
                             clip_sample=clip, noise=z)

    _gc(f, x, m, z)
    _compare_with_reference_grads(f, x, m, z)


def _compare_with_reference_grads(f, x, m, z):
    """The fused backward equals autograd through the pure-torch reference."""
    inputs = [v for v in (x, m, z) if v is not None]
    out = f(x, m, z)
    g = randn(*out.shape, dtype=F64, seed=99)
    got = torch.autograd.grad(out, inputs, g)
    ref = torch.autograd.grad(f(x, m, z, ops=dk.reference), inputs, g)
    for a, b in zip(got, ref, strict=True):
        assert max_rel_err(a, b) <= 1e-10


def test_gradcheck_broadcast_model_output_and_noise():
    x = _rg(3, 2, 4, seed=26, dtype=F64, grad=True)
    m = _rg(1, 2, 4, seed=27, dtype=F64, grad=True)
    z = _rg(4, seed=28, dtype=F64, grad=True)
    _gc(lambda x, m, z: dk.ddim_step(x, m, torch.tensor([500, 20, 3]), 0.5, noise=z, clip_sample=1.0), x, m, z)
    _gc(lambda x, m, z: dk.ddpm_step(x, m, 500, noise=z), x, m, z)
    _gc(lambda x, s, z: dk.langevin_step(x, s, 0.05, noise=z), x, m, z)
    _gc(lambda x0, z: dk.q_sample(x0, 77, z)[0], x, z)


def test_gradcheck_q_sample():
    x0, z = (_rg(3, 5, seed=s, dtype=F64, grad=True) for s in (29, 30))
    _gc(lambda x0, z: dk.q_sample(x0, torch.tensor([0, 500, 999]), z)[0], x0, z)
    _gc(lambda x0: dk.q_sample(x0, 500, generator=torch.Generator().manual_seed(1))[0], x0)


def test_gradcheck_langevin_step():
    x, s, z = (_rg(4, 6, seed=q, dtype=F64, grad=True) for q in (31, 32, 33))
    _gc(lambda x, s, z: dk.langevin_step(x, s, 0.013, noise=z), x, s, z)
    _gc(lambda x, s: dk.langevin_step(x, s, 0.2, generator=torch.Generator().manual_seed(2)), x, s)


def test_backward_of_noncontiguous_inputs():
    x = randn(4, 3, dtype=F64, seed=34).t().requires_grad_()
    m = randn(3, 8, dtype=F64, seed=35)[:, ::2].requires_grad_()
    z = randn(3, 4, dtype=F64, seed=36).requires_grad_()
    _gc(lambda x, m, z: dk.ddim_step(x, m, 800, 0.5, t_prev=700, noise=z), x, m, z)


# ---- torch.compile -------------------------------------------------------------------
def _ddim_loop(x, eps, ts, tps):
    for i in range(ts.shape[0]):
        x = dk.ddim_step(x, eps, ts[i], 0.0, t_prev=tps[i], schedule=SCHED)
    return x


def test_compile_ddim_loop_fullgraph():
    """A short eta = 0 DDIM loop with tensor timesteps compiles with no graph break and
    matches eager."""
    torch._dynamo.reset()
    x, eps = randn(2, 3, 8, 8, seed=37), randn(2, 3, 8, 8, seed=38)
    ts = torch.tensor([900, 600, 300, 100])
    tps = torch.tensor([600, 300, 100, -1])
    eager = _ddim_loop(x, eps, ts, tps)
    compiled = torch.compile(_ddim_loop, fullgraph=True)(x, eps, ts, tps)
    assert max_rel_err(compiled, eager) <= 1e-6
    # the eager loop is the reference's loop
    ref = x
    for t, tp in zip(ts.tolist(), tps.tolist(), strict=True):
        ref = dk.reference.ddim_step(ref, eps, t, 0.0, t_prev=tp, schedule=SCHED)
    assert max_rel_err(eager, ref) <= 1e-6


def test_compile_ddim_loop_fullgraph_int_timesteps():
    """Python-int timesteps are constants to dynamo: one graph, equal to eager."""
    torch._dynamo.reset()

    def loop(x, eps):
        for t, tp in ((900, 600), (600, 300), (300, 100), (100, -1)):
            x = dk.ddim_step(x, eps, t, 0.0, t_prev=tp, schedule=SCHED)
        return x

    x, eps = randn(2, 3, 8, 8, seed=41), randn(2, 3, 8, 8, seed=42)
    compiled = torch.compile(loop, fullgraph=True)(x, eps)
    assert max_rel_err(compiled, loop(x, eps)) <= 1e-6


def test_compile_raw_op_loop_fullgraph():
    """The custom op itself (fake kernel, no validation) traces into one graph."""
    torch._dynamo.reset()
    op = torch.ops.diffkern.ddim_step

    def loop(x, eps, ts, tps, table):
        for i in range(ts.shape[0]):
            x = op(x, eps, ts[i:i + 1], tps[i:i + 1], table, 0.0, 0, 0.0, None, None, 0, 0)
        return x

    x, eps = randn(2, 3, 8, 8, seed=39), randn(2, 3, 8, 8, seed=40)
    ts = torch.tensor([900, 600, 300, 100])
    tps = torch.tensor([600, 300, 100, -1])
    eager = loop(x, eps, ts, tps, TABLE)
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x, eps, ts, tps, TABLE)
    assert torch.equal(compiled, eager)
    # the same kernel runs both, so the equality cannot see a numeric bug: eager is held to
    # the reference's loop too
    ref = x
    for t, tp in zip(ts.tolist(), tps.tolist(), strict=True):
        ref = dk.reference.ddim_step(ref, eps, t, 0.0, t_prev=tp, schedule=SCHED)
    assert max_rel_err(eager, ref) <= 1e-6


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_backward_through_steps(backend):
    """Gradients through the C++ autograd kernels (csrc/torch/autograd.cpp) under
    torch.compile equal eager ones: DDIM with per-sample t and broadcast noise, DDPM, and
    a Langevin step, as in training through a sampler."""
    torch._dynamo.reset()

    def f(x, m, z):
        y = dk.ddim_step(x, m, torch.tensor([700, 30]), 0.6, t_prev=torch.tensor([500, -1]), noise=z)
        y = dk.ddpm_step(y, m, 400, noise=z, clip_sample=2.0)
        return dk.langevin_step(y, m * 0.5, 0.01, noise=z).square().sum()

    def grads(fn):
        x, m = randn(2, 3, 5, seed=43).requires_grad_(), randn(2, 3, 5, seed=44).requires_grad_()
        z = randn(1, 3, 5, seed=45).requires_grad_()
        fn(x, m, z).backward()
        return x.grad, m.grad, z.grad

    want = grads(f)
    got = grads(torch.compile(f, fullgraph=True, backend=backend))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and max_rel_err(g, w) <= 1e-5
    # compiled and eager run the same kernel, so the above cannot see a wrong derivative:
    # eager is also held to autograd through the float64 reference
    x, m = randn(2, 3, 5, seed=43, dtype=torch.float64).requires_grad_(), randn(2, 3, 5, seed=44,
                                                                              dtype=torch.float64).requires_grad_()
    z = randn(1, 3, 5, seed=45, dtype=torch.float64).requires_grad_()
    y = dk.reference.ddim_step(x, m, torch.tensor([700, 30]), 0.6, t_prev=torch.tensor([500, -1]), noise=z)
    y = dk.reference.ddpm_step(y, m, 400, noise=z, clip_sample=2.0)
    dk.reference.langevin_step(y, m * 0.5, 0.01, noise=z).square().sum().backward()
    for w, r in zip(want, (x.grad, m.grad, z.grad), strict=True):
        assert max_rel_err(w, r) <= 1e-5


def test_caches_filled_in_inference_mode_work_with_autograd_later():
    """The first call of a process may come inside torch.inference_mode (a sampler); the
    per-device tensors diffkern caches then (int timesteps, the schedule table) must still
    be usable by a later differentiable call, which saves them for backward."""
    sched = dk.NoiseSchedule.linear(1000, 2e-4, 0.03)  # fresh: nothing cached yet
    with torch.inference_mode():
        s2 = dk.NoiseSchedule.linear(900, 1e-4, 0.02)  # built inside, too
        for s in (sched, s2):
            xi = torch.randn(2, 3)
            dk.ddim_step(xi, xi, 777, 0.0, t_prev=555, schedule=s)
            dk.ddpm_step(xi, xi, 777, schedule=s, noise=xi)
            dk.q_sample(xi, 777, schedule=s)
    for s in (sched, s2):
        grads = []
        for ops, dtype in ((dk, torch.float32), (dk.reference, torch.float64)):
            x = randn(2, 3, seed=50, dtype=dtype).requires_grad_()
            y = (ops.ddim_step(x, x * 0.5, 777, 0.0, t_prev=555, schedule=s)
                 + ops.ddpm_step(x, x, 777, schedule=s, noise=x))
            y = y + ops.q_sample(x, 777, schedule=s, noise=x)[0]
            y.sum().backward()
            grads.append(x.grad)
        # the gradient the cached tensors give is the float64 reference's (autograd through
        # the pure-PyTorch ops), not merely finite
        assert max_rel_err(grads[0], grads[1]) <= 1e-6
