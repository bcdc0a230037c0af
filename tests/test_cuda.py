"""CUDA kernels against the float64 reference, against the CPU kernels (noise), under
CUDA-graph capture and torch.compile. Skipped without a GPU."""

import pytest
import torch

import diffkern as dk
from diffkern import reference as R

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not dk.native_available("cuda") if torch.cuda.is_available() else True,
                       reason="diffkern was built without CUDA"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(1,), (7,), (3, 341), (2, 4, 33, 31)]


def _rand(shape, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEV, dtype)


def _tol(dtype):
    # fp32 math with float32 coefficients on the GPU vs a float64 oracle; half types are
    # compared with the fp32 reference rounded to the dtype (see _check).
    return {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]


def _check(out, ref64, dtype, ref_same_dtype=None):
    assert out.dtype == dtype and out.shape == ref64.shape
    assert torch.isfinite(out).all()
    if dtype in (torch.float16, torch.bfloat16):
        # The kernel's fp32 value may differ from the reference's by the fp32 tolerance
        # (nvcc contracts a*x + b*m into FMAs; the CPU build and the reference do not), and
        # each side then rounds to the dtype. Near zero (cancellation: outputs of 3e-6 at
        # 8k elements in bf16, about 1e-7 absolute fp32 error there) that fp32 difference
        # is larger than 2 ulp of the output, so it is allowed as an absolute term.
        ref = ref_same_dtype.to(torch.float64)
        ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
        fp32_slack = _tol(torch.float32) * ref64.abs().max()
        err = (out.double() - ref).abs()
        # The slack is below one ulp wherever |ref| > 1.3e-4 max|ref| (bf16), 1e-3 max|ref| (fp16).
        assert bool((err <= 2 * ulp + fp32_slack).all()), f"max err/ulp {(err / ulp).max().item():.3g}"
    else:
        err = (out.double() - ref64).abs().max() / ref64.abs().max()
        assert err <= _tol(dtype), f"relative error {err:.3g}"


def _per_sample_t(shape, seed, lo=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, 1000, (shape[0],), generator=g).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("op", ["ddim0", "ddim", "ddpm", "ddpm_large", "q", "langevin"])
def test_ops_vs_reference(op, shape, dtype):
    x, m, z = (_rand(shape, dtype, s) for s in (1, 2, 3))
    t = _per_sample_t(shape, 4)
    tp = (t - 37).clamp_min(-1)
    kw = dict(prediction_type="v_prediction", clip_sample=1.5)

    def run(fn, *a):
        if op == "ddim0":
            return fn.ddim_step(*a[:2], t, 0.0, t_prev=tp, **kw)
        if op == "ddim":
            return fn.ddim_step(*a[:2], t, 0.6, t_prev=tp, noise=a[2], **kw)
        if op == "ddpm":
            return fn.ddpm_step(*a[:2], t, noise=a[2])
        if op == "ddpm_large":
            return fn.ddpm_step(*a[:2], t, t_prev=tp, noise=a[2], variance="fixed_large", prediction_type="sample")
        if op == "q":
            return fn.q_sample(a[0], t, a[2])[0]
        return fn.langevin_step(*a[:2], 0.013, noise=a[2])

    out = run(dk, x, m, z)
    ref64 = run(R, x.double(), m.double(), z.double())
    _check(out, ref64, dtype, run(R, x, m, z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_and_misaligned(dtype):
    n = 2**24 + 3
    base = _rand((n + 1,), dtype, 5)
    x = base[1:]  # offset by one element: not 16-byte aligned -> scalar path
    m = _rand((n,), dtype, 6)
    z = _rand((n,), dtype, 7)
    for xx in (x, base[:-1]):  # misaligned (scalar path), then aligned (16-byte vector path)
        out = dk.ddim_step(xx, m, 500, 0.8, t_prev=400, noise=z)
        ref64 = R.ddim_step(xx.double(), m.double(), 500, 0.8, t_prev=400, noise=z.double())
        _check(out, ref64, dtype, R.ddim_step(xx, m, 500, 0.8, t_prev=400, noise=z))


def test_non_contiguous_and_broadcast():
    x = _rand((4, 6, 10, 12), torch.float32, 8).transpose(1, 3)
    m = _rand((1, 12, 10, 6), torch.float32, 9)  # broadcast over the batch
    t = _per_sample_t((4,), 10)
    out = dk.ddpm_step(x, m, t, noise=_rand((4, 12, 10, 6), torch.float32, 11))
    ref = R.ddpm_step(x.double(), m.double(), t, noise=_rand((4, 12, 10, 6), torch.float32, 11).double())
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-6


@pytest.mark.parametrize("op", ["ddim", "ddpm", "q", "langevin"])
def test_noise_matches_cpu(op):
    """One CPU generator state -> the same in-kernel noise on the CPU and on CUDA (the key
    is the generator's next words either way; CUDA generators key by their Philox offset,
    test_noise.py::test_cuda_noise_is_the_documented_stream)."""
    shape = (3, 5, 37)
    x, m = _rand(shape, torch.float32, 12), _rand(shape, torch.float32, 13)
    t = torch.tensor([900, 500, 3])

    def run(dev):
        g = torch.Generator().manual_seed(1234)
        xs, ms, ts = x.to(dev), m.to(dev), t.to(dev)
        outs = []
        for _ in range(3):  # successive calls advance both generators alike
            if op == "ddim":
                outs.append(dk.ddim_step(xs, ms, ts, 1.0, generator=g))
            elif op == "ddpm":
                outs.append(dk.ddpm_step(xs, ms, ts, generator=g))
            elif op == "q":
                outs.append(dk.q_sample(xs, ts, generator=g)[1])
            else:
                outs.append(dk.langevin_step(xs, ms, 0.1, generator=g))
        return torch.stack(outs).cpu()

    gpu, cpu = run(DEV), run("cpu")
    assert (gpu - cpu).abs().max() <= 1e-6 * max(1.0, cpu.abs().max().item() / 4)
    assert not torch.equal(gpu[0], gpu[1])


def test_noise_statistics():
    from scipy import stats

    x = _rand((1000, 1000), torch.float32, 14)
    _, z = dk.q_sample(x, 10, generator=torch.Generator(device=DEV).manual_seed(3))
    z = z.double().cpu().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    r = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(r) < 5 / n**0.5


def test_backward_matches_reference():
    for dtype in (torch.float32, torch.float64):
        x = _rand((3, 4, 9), dtype, 15).requires_grad_()
        m = _rand((3, 4, 9), dtype, 16).requires_grad_()
        z = _rand((3, 4, 9), dtype, 17).requires_grad_()
        t = torch.tensor([999, 400, 20], device=DEV)
        g = _rand((3, 4, 9), dtype, 18)
        for fn in (dk, R):
            out = fn.ddim_step(x, m, t, 0.7, t_prev=t - 20, clip_sample=1.0, noise=z)
            grads = torch.autograd.grad(out, (x, m, z), g)
            if fn is dk:
                native = grads
        for a, b in zip(native, grads, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_gmm_loop_matches_reference():
    w = torch.tensor([0.8, 0.2], device=DEV, dtype=torch.float64)
    mu = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], device=DEV, dtype=torch.float64)
    sd = torch.ones(2, device=DEV, dtype=torch.float64)
    x = (torch.rand(257, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 16 - 8).to(DEV)
    sig = torch.logspace(torch.log10(torch.tensor(20.0)), 0, 4).tolist()
    a = dk.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=5, step_lr=0.1, denoise=True,
                                 generator=torch.Generator(device=DEV).manual_seed(9))
    b = R.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=5, step_lr=0.1, denoise=True,
                                generator=torch.Generator(device=DEV).manual_seed(9))
    # The chain is float64 but the noise is float32 from polynomials that nvcc contracts
    # into FMAs: a few float32 ulps per normal, carried along a contracting chain.
    assert (a - b).abs().max() < 1e-5


def test_gmm_mode_weights():
    w = torch.tensor([0.8, 0.2], device=DEV)
    mu = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], device=DEV)
    sd = torch.ones(2, 2, device=DEV)
    x = torch.rand(20000, 2, device=DEV) * 16 - 8
    sig = torch.exp(torch.linspace(torch.log(torch.tensor(20.0)), 0.0, 10)).tolist()
    out = dk.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=100, step_lr=0.1,
                                   generator=torch.Generator(device=DEV).manual_seed(1))
    frac = ((out - mu[0]).norm(dim=1) < (out - mu[1]).norm(dim=1)).float().mean().item()
    assert abs(frac - 0.8) < 0.02


def test_cuda_graph_replay_equals_eager():
    x0 = _rand((4, 3, 16, 16), torch.float32, 19)
    m = _rand((4, 3, 16, 16), torch.float32, 20)
    ts = [torch.full((4,), 999 - 50 * i, device=DEV) for i in range(10)]

    def loop(x, g):
        for i in range(10):
            x = dk.ddim_step(x, m * 0.1 + x * 0.05, ts[i], 1.0, t_prev=ts[i] - 50, generator=g)
        return x

    g = torch.cuda.default_generators[torch.cuda.current_device()]
    static_x = x0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop(static_x, g)  # warm up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    torch.manual_seed(77)
    with torch.cuda.graph(graph):
        static_out = loop(static_x, None)
    replays = []
    torch.manual_seed(77)
    for _ in range(2):
        graph.replay()
        replays.append(static_out.clone())
    assert not torch.equal(replays[0], replays[1]), "replays must draw fresh noise"
    torch.manual_seed(77)
    eager = [loop(x0.clone(), None) for _ in range(2)]
    for r, e in zip(replays, eager, strict=True):
        assert (r - e).abs().max() <= 1e-5


def test_compile_reduce_overhead():
    x = _rand((2, 4, 8, 8), torch.float32, 21)
    m = _rand((2, 4, 8, 8), torch.float32, 22)
    t = torch.tensor([800, 600], device=DEV)

    def loop(x, m, t):
        for i in range(4):
            x = dk.ddim_step(x, m * 0.1, t - 100 * i, 0.0, t_prev=t - 100 * (i + 1))
        return x

    compiled = torch.compile(loop, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x, m, t)
    assert (out - loop(x, m, t)).abs().max() <= 1e-5


def test_opcheck_cuda():
    x, m, z = (_rand((2, 3, 5), torch.float32, s) for s in (23, 24, 25))
    tab = dk.NoiseSchedule.linear().table(DEV)
    t = torch.tensor([10, 500], device=DEV)
    ops = torch.ops.diffkern
    torch.library.opcheck(ops.ddim_step, (x, m, t, None, tab, 0.5, 0, 1.0, z, None, 0, 0))
    torch.library.opcheck(ops.ddpm_step, (x, m, t, t - 3, tab, 0, 2, 0.0, z, None, 0, 0))
    torch.library.opcheck(ops.q_sample, (x, t, tab, z, None, 0, 0))
    torch.library.opcheck(ops.langevin_step, (x, m, 0.01, z, None, 0, 0))


# ---- sampler families (csrc/kernels/<op>.h) on CUDA -------------------------------
# The cases and oracles of tests/test_native_samplers.py (every op and mode; float64 to
# 1e-13, float32 against float64 to 1e-6, fp16/bf16 to 2 ulp plus float32 rounding of the
# terms), on CUDA tensors, per-sample levels on the device (ps*) or as CPU 0-d tensors and
# Python numbers; drawn noise equal to the CPU's for the same seed. Empty where the
# native CPU build is missing (test_native_samplers cannot even be collected then).
try:
    import test_native_samplers as NS  # tests/ is on sys.path; one copy of the tables
except Exception:  # noqa: BLE001  its module-level cases need the native CPU ops
    NS = None
_NS_OPS = list(NS.OPS) if NS else []
_NS_CASES = NS.CASES if NS else []
_NS_GEN_OPS = list(NS.GEN_OPS) if NS else []
_NS_HALF = NS.HALF if NS else ()

_TENSORS = ("x", "m", "x2", "m2", "z")


def _on_cuda(a, kind):
    b = NS.SimpleNamespace(**vars(a))
    for k, v in vars(a).items():
        if isinstance(v, torch.Tensor) and (k in _TENSORS or kind.startswith("ps")):
            setattr(b, k, v.to(DEV))
    return b


@pytest.mark.parametrize("case", _NS_CASES, ids=NS._case_id if NS else None)
@pytest.mark.parametrize("name", _NS_OPS)
def test_sampler_ops_vs_reference(name, case):
    shape, kind = case
    for dtype, seed_tag in ((torch.float64, 64), (torch.float32, 32)):
        a = _on_cuda(NS._args(shape, dtype, kind, NS._seed(name, case, seed_tag)), kind)
        got = NS._outs(NS.OPS[name](dk, a))
        ref = NS._outs(NS.OPS[name](R, NS._up(a)))
        for g, r in zip(got, ref, strict=True):
            assert g.device.type == torch.device(DEV).type and g.dtype == dtype and g.shape == a.x.shape
            err = ((g.double() - r).abs().max() / r.abs().max()).item()
            assert err <= (1e-13 if dtype == torch.float64 else 1e-6), f"{name} {case} {dtype}: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", _NS_HALF, ids=["fp16", "bf16"][:len(_NS_HALF)])
@pytest.mark.parametrize("name", _NS_OPS)
def test_sampler_ops_half(name, dtype):
    a = _on_cuda(NS._args((3, 11, 31), dtype, "ps32", NS._seed(name, 16)), "ps32")
    for g, r in zip(NS._outs(NS.OPS[name](dk, a)), NS._outs(NS.OPS[name](R, a)), strict=True):
        assert g.dtype == dtype
        NS._assert_half_close(g.cpu(), r.cpu(), f"{name} {dtype}")


def test_sampler_ops_strided_and_broadcast():
    x = _rand((4, 6, 10, 12), torch.float32, 30).transpose(1, 3)
    m = _rand((1, 12, 10, 6), torch.float32, 31)
    s = torch.tensor([9.0, 3.0, 1.0, 0.4], device=DEV)
    got = dk.dpmpp_2m_step(x, m, m * 0.9, s, s * 0.5, s * 1.7, prediction_type="epsilon")
    ref = R.dpmpp_2m_step(x.double(), m.double(), m.double() * 0.9, s.double(), s.double() * 0.5, s.double() * 1.7,
                          prediction_type="epsilon")
    assert (got.double() - ref).abs().max() / ref.abs().max() <= 1e-6


@pytest.mark.parametrize("name", _NS_GEN_OPS)
def test_sampler_keyed_noise_matches_cpu(name):
    """Per-sample keys (seeds=, step=): the same noise on the CPU and on CUDA, step after
    step (the README's device-independent noise)."""
    a = NS._args((3, 1001), torch.float32, "ps32", 40)
    ad = _on_cuda(a, "ps32")
    seeds = torch.tensor([5, 2**40 + 1, -9])
    for step in range(2):
        NS._assert_noise_close(NS._outs(NS.GEN_OPS[name](dk, ad, None, seeds=seeds.to(DEV), step=step))[0].cpu(),
                               NS._outs(NS.GEN_OPS[name](dk, a, None, seeds=seeds, step=step))[0])


@pytest.mark.parametrize("name", _NS_GEN_OPS)
def test_sampler_generator_noise_replays_on_cuda(name):
    """A CUDA generator's noise is a function of its (seed, offset): a fresh generator of
    the same seed replays it bitwise, the next call draws fresh noise, and the reference
    draws the same numbers. CPU and CUDA generators of one seed differ by design."""
    ad = _on_cuda(NS._args((3, 1001), torch.float32, "ps32", 40), "ps32")
    gd = torch.Generator(device=DEV).manual_seed(5)
    first, second = (NS._outs(NS.GEN_OPS[name](dk, ad, gd))[0] for _ in range(2))
    if name != "lcm_final":  # the final LCM step returns the denoised sample: no noise
        assert not torch.equal(first, second)
    assert torch.equal(NS._outs(NS.GEN_OPS[name](dk, ad, torch.Generator(device=DEV).manual_seed(5)))[0], first)
    NS._assert_noise_close(NS._outs(NS.GEN_OPS[name](dk, ad, torch.Generator(device=DEV).manual_seed(5))),
                           NS._outs(NS.GEN_OPS[name](R, ad, torch.Generator(device=DEV).manual_seed(5))))
