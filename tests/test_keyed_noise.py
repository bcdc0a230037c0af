"""Per-sample keyed noise (seeds=, step=): the normal of element j of sample b is a pure
function of (seeds[b], step, j) — the same for any batch composition, order, split or
process count, on the CPU and on CUDA — for every op and sampler that draws; native ==
reference; statistics as for generator noise."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within_ulp, gen, needs_cuda, needs_native, randn

import diffkern as dk
from diffkern import _rng
from diffkern import samplers as S


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


SEEDS = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63), 987654321], dtype=torch.int64)


# ---- the oracle ------------------------------------------------------------------------
def test_keyed_normal_is_the_documented_stream():
    """Sample b = the (seeds[b], offset 4 step) stream at groups 2^63 + j/4."""
    inner = 23
    z = _rng.keyed_normal(SEEDS, 7, inner)
    for b, s in enumerate(SEEDS.tolist()):
        assert torch.equal(z[b], _rng.philox_normal(inner, s % 2**64, 4 * 7, start=4 * 2**63))


def test_keyed_normal_windows_and_tensor_step():
    full = _rng.keyed_normal(SEEDS, 3, 103)
    for start, n in ((0, 1), (1, 5), (3, 9), (50, 53), (101, 2)):
        assert torch.equal(_rng.keyed_normal(SEEDS, 3, 103, start=start, numel=n), full[:, start:start + n])
    assert torch.equal(_rng.keyed_normal(SEEDS, torch.tensor(3), 103), full)
    assert not torch.equal(_rng.keyed_normal(SEEDS, 4, 103), full)


# ---- native == reference -------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("inner", [1, 2, 3, 5, 7, 8, 33, 4097, 3 * 4096 + 1])
def test_native_keyed_normal_matches_reference(inner):
    """Samples of every size (not multiples of 4: samples start mid-group), several
    chunks (4096 elements) and ragged tails; per-sample seeds and one seed for all."""
    B = 6 if inner < 1000 else 3
    seeds = SEEDS[:B]
    for step in (0, 5, 2**62 - 1):
        got = torch.ops.diffkern.keyed_normal(seeds, None, step, B, inner)
        ref = _rng.keyed_normal(seeds, step, inner)
        assert got.shape == (B, inner) and got.dtype == torch.float32
        assert torch.equal(got, ref)  # the CPU kernels equal the reference bitwise
    one = torch.ops.diffkern.keyed_normal(seeds[2:3], torch.tensor([9]), 0, B, inner)
    assert torch.equal(one, _rng.keyed_normal(seeds[2:3].expand(B), 9, inner))


@needs_native
def test_native_keyed_normal_independent_of_thread_count():
    seeds = torch.arange(40, dtype=torch.int64) * 7919
    torch.set_num_threads(1)  # the autouse fixture restores the count
    a = torch.ops.diffkern.keyed_normal(seeds, None, 3, 40, 3001)
    torch.set_num_threads(2)
    assert torch.equal(torch.ops.diffkern.keyed_normal(seeds, None, 3, 40, 3001), a)


def _ops_with_seeds(x, m, seeds, step, ref=False):
    """One call of every noisy op with seeds= (the reference module when ref)."""
    D = dk.reference if ref else dk
    t = torch.tensor([900, 500, 100, 10, 600, 3, 42][:x.shape[0]])
    sig = torch.linspace(3.0, 0.5, x.shape[0]).double()
    return {
        "q_sample": D.q_sample(x, t, seeds=seeds, step=step),
        "ddim": D.ddim_step(x, m, t, 1.0, seeds=seeds, step=step),
        "ddpm": D.ddpm_step(x, m, t, seeds=seeds, step=step),
        "langevin": D.langevin_step(x, m, 0.02, seeds=seeds, step=step),
        "euler_a": D.euler_step(x, m, sig, sig * 0.7, eta=1.0, seeds=seeds, step=step),
        "euler_churn": D.euler_step(x, m, sig, sig * 0.7, gamma=0.3, prediction_type="epsilon", seeds=seeds,
                                    step=step),
        "flow": D.flow_step(x, m, sig / 4, sig / 5, stochastic=True, seeds=seeds, step=step),
        "flow_q": D.flow_q_sample(x, sig / 4, seeds=seeds, step=step),
        "lcm": D.lcm_step(x, m, t, t - 3, seeds=seeds, step=step),
    }


def _flat(out):
    return {k: (v[0] if isinstance(v, tuple) else v) for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_op_native_equals_reference_with_seeds(dtype):
    B, n = 5, 3 * 7 * 11
    x = randn(B, 3, 7, 11, seed=1, dtype=dtype)
    m = randn(B, 3, 7, 11, seed=2, dtype=dtype)
    seeds = torch.tensor([11, 12, 13, 14, 15])
    got = _flat(_ops_with_seeds(x, m, seeds, 4))
    ref = _flat(_ops_with_seeds(x, m, seeds, 4, ref=True))
    # The keyed normals are bitwise the reference's (below); what remains is the step's own
    # arithmetic: the tolerances of every native-vs-reference test (tests/test_native_cpu.py).
    # Measured: float64 1.6e-16, float32 8.5e-8 (euler/lcm), bfloat16 0 ulp.
    tol = {torch.float32: 1e-6, torch.float64: 1e-13}.get(dtype)
    for k in got:
        assert got[k].dtype == dtype, k
        if tol is None:
            assert_within_ulp(got[k], ref[k], 2, k)
        else:
            assert (got[k].double() - ref[k].double()).abs().max().item() <= tol * max(1, ref[k].abs().max().item()), k
    # and q_sample returns exactly the keyed noise, rounded to x's dtype
    z = dk.q_sample(x, 10, seeds=seeds, step=4)[1]
    assert torch.equal(z, _rng.keyed_normal(seeds, 4, n).reshape(x.shape).to(dtype))


# ---- invariance: batch split, position, order; a sample alone -------------------------
def test_ops_invariant_to_batch_split_position_and_order():
    B = 7
    x, m = randn(B, 5, 9, seed=3), randn(B, 5, 9, seed=4)
    seeds = torch.arange(100, 100 + B)
    full = _flat(_ops_with_seeds(x, m, seeds, 12))
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    shuffled = _flat(_ops_with_seeds_rows(x, m, seeds, 12, perm))
    for k in full:
        assert torch.equal(shuffled[k], full[k][perm]), k
    # halves (4 + 3), then each sample alone, equal the rows of the full call
    for rows in (torch.arange(0, 4), torch.arange(4, 7), *(torch.tensor([b]) for b in range(B))):
        part = _flat(_ops_with_seeds_rows(x, m, seeds, 12, rows))
        for k in full:
            assert torch.equal(part[k], full[k][rows]), (k, rows.tolist())


def _ops_with_seeds_rows(x, m, seeds, step, rows):
    """_ops_with_seeds on the given rows, with the per-sample t / sigma of those rows."""
    t_all = torch.tensor([900, 500, 100, 10, 600, 3, 42])
    sig_all = torch.linspace(3.0, 0.5, x.shape[0]).double()
    xs, ms, ss, t, sig = x[rows], m[rows], seeds[rows], t_all[rows], sig_all[rows]
    return {
        "q_sample": dk.q_sample(xs, t, seeds=ss, step=step),
        "ddim": dk.ddim_step(xs, ms, t, 1.0, seeds=ss, step=step),
        "ddpm": dk.ddpm_step(xs, ms, t, seeds=ss, step=step),
        "langevin": dk.langevin_step(xs, ms, 0.02, seeds=ss, step=step),
        "euler_a": dk.euler_step(xs, ms, sig, sig * 0.7, eta=1.0, seeds=ss, step=step),
        "euler_churn": dk.euler_step(xs, ms, sig, sig * 0.7, gamma=0.3, prediction_type="epsilon", seeds=ss,
                                     step=step),
        "flow": dk.flow_step(xs, ms, sig / 4, sig / 5, stochastic=True, seeds=ss, step=step),
        "flow_q": dk.flow_q_sample(xs, sig / 4, seeds=ss, step=step),
        "lcm": dk.lcm_step(xs, ms, t, t - 3, seeds=ss, step=step),
    }


def test_int_seed_means_every_sample_and_depends_on_nothing_else():
    x = randn(3, 40, seed=5)
    a = dk.q_sample(x, 100, seeds=77, step=2)[1]
    assert torch.equal(a, dk.q_sample(x, 100, seeds=torch.tensor([77, 77, 77]), step=2)[1])
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    # not the layout, dtype path or step type
    assert torch.equal(dk.q_sample(x.t().contiguous().t(), 100, seeds=77, step=torch.tensor(2))[1], a)
    assert torch.equal(dk.q_sample(randn(3, 80, seed=6)[:, ::2], 100, seeds=77, step=2)[1], a)
    assert not torch.equal(dk.q_sample(x, 100, seeds=77, step=3)[1], a)
    assert not torch.equal(dk.q_sample(x, 100, seeds=78, step=2)[1], a)


class _Eps(torch.nn.Module):
    """A fixed per-sample 'network' (no batch coupling)."""

    def forward(self, x, t):
        return 0.2 * torch.tanh(x) + 1e-4 * t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * x


def test_samplers_sample_alone_equals_its_row():
    N, shape = 5, (5, 2, 3, 3)
    seeds = torch.arange(1000, 1000 + N)
    model = _Eps()
    for fn, kw in ((S.ddpm_sample, {"n_steps": 8}), (S.ddim_sample, {"n_steps": 6, "eta": 1.0})):
        full = fn(model, shape, seeds=seeds, device="cpu", **kw)
        assert full.shape == shape
        for k in (0, 3):
            alone = fn(model, (1, *shape[1:]), seeds=seeds[k:k + 1], device="cpu", **kw)
            assert torch.equal(alone[0], full[k])
        # x_T is keyed_randn(seeds, shape, step=X_T_STEP)
        x_t = dk.keyed_randn(seeds, shape, step=_rng.X_T_STEP)
        assert torch.equal(fn(model, shape, x_T=x_t, seeds=seeds, device="cpu", **kw), full)


def test_k_samplers_and_langevin_sample_alone_equals_its_row():
    N = 4
    seeds = torch.tensor([5, 50, 500, 5000])
    x = dk.keyed_randn(seeds, (N, 3, 4)) * 10

    def den(x_, sigma, **kw):
        return x_ / (1 + sigma.reshape(-1, 1, 1) ** 2)

    sig = S.get_sigmas_karras(6, 0.1, 10.0)
    runs = [
        lambda xs, ss: S.sample_euler_ancestral(den, xs, sig, disable=True, seeds=ss),
        lambda xs, ss: S.sample_euler(den, xs, sig, disable=True, s_churn=1.0, seeds=ss),
        lambda xs, ss: S.sample_heun(den, xs, sig, disable=True, s_churn=1.0, seeds=ss),
        lambda xs, ss: S.sample_lcm(den, xs, sig, disable=True, seeds=ss),
        lambda xs, ss: S.sample_flow_euler(lambda x_, s_: x_ * 0.1, xs, torch.linspace(1, 0, 6), disable=True,
                                           stochastic=True, seeds=ss),
        lambda xs, ss: dk.annealed_langevin(lambda x_, s_: -x_ / (1 + s_**2), xs, [1.0, 0.5], n_steps_each=3,
                                            step_lr=0.05, seeds=ss),
    ]
    for run in runs:
        full = run(x, seeds)
        for k in (1, 3):
            assert torch.equal(run(x[k:k + 1], seeds[k:k + 1])[0], full[k])
        assert not torch.equal(full, run(x, seeds + 1))


# ---- arguments -------------------------------------------------------------------------
def test_seeds_bad_inputs():
    x, m = randn(3, 8, seed=7), randn(3, 8, seed=8)
    with pytest.raises(ValueError, match="seeds or generator"):
        dk.q_sample(x, 5, seeds=1, generator=gen(1))
    with pytest.raises(ValueError, match="seeds or noise"):
        dk.ddpm_step(x, m, 5, seeds=1, noise=m)
    with pytest.raises(ValueError, match="seeds"):
        dk.langevin_step(x, m, 0.1, seeds=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seeds"):
        dk.langevin_step(x, m, 0.1, seeds=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="seeds"):
        dk.langevin_step(x, m, 0.1, seeds=1.5)
    with pytest.raises(ValueError, match="step"):
        dk.langevin_step(x, m, 0.1, seeds=1, step=-1)
    with pytest.raises(ValueError, match="step"):
        dk.langevin_step(x, m, 0.1, seeds=1, step=2**62)
    with pytest.raises(TypeError, match="step"):
        dk.langevin_step(x, m, 0.1, seeds=1, step=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="step= needs seeds"):
        dk.langevin_step(x, m, 0.1, step=3)
    with pytest.raises(ValueError, match="seeds or noise_sampler"):
        S.sample_euler_ancestral(lambda x_, s_: x_, x, torch.tensor([2.0, 1.0, 0.0]), disable=True, seeds=1,
                                 noise_sampler=lambda a, b: torch.zeros_like(x))
    with pytest.raises(ValueError, match="seeds or generator"):
        S.ddpm_sample(_Eps(), (3, 8), n_steps=2, seeds=1, generator=gen(1), device="cpu")
    # eta = 0 draws nothing: seeds are checked, the step is deterministic
    assert torch.equal(dk.ddim_step(x, m, 5, 0.0, seeds=torch.tensor([1, 2, 3])), dk.ddim_step(x, m, 5, 0.0))


# ---- statistics -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_big():
    """1000 samples (seeds 0..999, adjacent) x 1000 elements at two adjacent steps."""
    seeds = torch.arange(1000, dtype=torch.int64)
    return dk.keyed_randn(seeds, (1000, 1000), step=0), dk.keyed_randn(seeds, (1000, 1000), step=1)


def test_keyed_noise_moments_and_ks(keyed_big):
    stats = pytest.importorskip("scipy.stats", reason="scipy for the KS test")
    z = keyed_big[0].double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert stats.kstest((1.01 * z).numpy(), "norm").pvalue < 1e-3
    for lane in range(4):  # each Philox lane (sin and cos branches) alone
        c = keyed_big[0][:, :1000].reshape(-1, 4)[:, lane].double()
        assert abs(c.mean().item()) < 5 / math.sqrt(c.numel())
        assert abs(c.var().item() - 1) < 5 * math.sqrt(2 / c.numel())


def test_keyed_noise_uncorrelated_across_samples_steps_seeds_and_elements(keyed_big):
    a, b = keyed_big
    n = a.numel() - 1000
    bound = 5 / math.sqrt(n)
    assert abs(_corr(a[:-1], a[1:])) < bound  # adjacent samples (seeds s, s + 1)
    assert abs(_corr(a[:-1] ** 2, a[1:] ** 2)) < bound
    assert abs(_corr(a, b)) < 5 / math.sqrt(a.numel())  # adjacent steps
    assert abs(_corr(a ** 2, b ** 2)) < 5 / math.sqrt(a.numel())
    flat = a.flatten()
    for lag in (1, 2, 3, 4, 1000):  # elements within and across samples
        assert abs(_corr(flat[:-lag], flat[lag:])) < 5 / math.sqrt(flat.numel())
    # seeds one bit apart in the high word, and keyed vs generator noise of the same seed
    s = torch.arange(1000, dtype=torch.int64)
    c = dk.keyed_randn(s | (1 << 40), (1000, 1000))
    assert abs(_corr(a, c)) < 5 / math.sqrt(a.numel())
    g = dk.q_sample(torch.zeros(1000, 1000), 10, generator=gen(0))[1]
    assert abs(_corr(a[:1], g[:1])) < 5 / math.sqrt(1000)


# ---- CUDA ------------------------------------------------------------------------------
@needs_cuda
def test_cuda_keyed_noise_equals_cpu():
    seeds = SEEDS
    for inner in (1, 3, 7, 4097):
        cpu = dk.keyed_randn(seeds, (6, inner), step=11)
        dev = dk.keyed_randn(seeds.cuda(), (6, inner), step=torch.tensor(11, device="cuda"))
        assert (dev.cpu() - cpu).abs().max().item() <= 1e-5
    x, m = randn(6, 5, 7, seed=9), randn(6, 5, 7, seed=10)
    for k, v in _flat(_ops_with_seeds(x, m, seeds, 3)).items():
        d = _flat(_ops_with_seeds(x.cuda(), m.cuda(), seeds, 3))[k]
        assert (d.cpu().double() - v.double()).abs().max().item() <= 1e-4 * max(1, v.abs().max().item()), k


@needs_cuda
def test_cuda_graph_replay_reads_seeds_and_step_buffers():
    x = randn(4, 1000, seed=11).cuda()
    m = randn(4, 1000, seed=12).cuda()
    seeds = torch.tensor([1, 2, 3, 4], device="cuda")
    step = torch.tensor(0, device="cuda")
    out = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (allocations) outside the capture
            out.copy_(dk.langevin_step(x, m, 0.01, seeds=seeds, step=step))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(dk.langevin_step(x, m, 0.01, seeds=seeds, step=step))
    for new_seeds, new_step in (([9, 8, 7, 6], 5), ([1, 2, 3, 4], 0), ([5, 5, 5, 5], 2**40)):
        seeds.copy_(torch.tensor(new_seeds))
        step.fill_(new_step)
        g.replay()
        want = dk.langevin_step(x.cpu(), m.cpu(), 0.01, seeds=torch.tensor(new_seeds), step=new_step)
        assert (out.cpu() - want).abs().max().item() <= 1e-5


# ---- keyed noise with broadcast levels: the same invariances ---------------------------
def _ops_keyed_layout(x, m, seeds, step, s, t):
    """Every noisy op with seeds= and levels s (sigma, in (0, 1)) / t in one layout."""
    return {
        "q_sample": dk.q_sample(x, t, seeds=seeds, step=step)[0],
        "ddim": dk.ddim_step(x, m, t, 1.0, t_prev=t - 7, seeds=seeds, step=step),
        "ddpm": dk.ddpm_step(x, m, t, seeds=seeds, step=step),
        "euler_a": dk.euler_step(x, m, s * 3, s * 2, eta=1.0, seeds=seeds, step=step),
        "flow": dk.flow_step(x, m, s, s * 0.5, stochastic=True, seeds=seeds, step=step),
        "flow_q": dk.flow_q_sample(x, s, seeds=seeds, step=step)[0],
        "lcm": dk.lcm_step(x, m, t, t - 9, seeds=seeds, step=step),
    }


@pytest.mark.parametrize("layout", ["per frame", "per token"])
def test_keyed_ops_with_broadcast_levels_invariant_to_batch_split(layout):
    """Per-frame (B,1,F,1,1) and per-token (B,N,1) levels with per-sample keys: halves, a
    permutation and each sample alone are bitwise the rows of the full batch."""
    B = 5
    g = torch.Generator().manual_seed(21)
    if layout == "per frame":
        shape, lshape = (B, 3, 4, 5, 7), (B, 1, 4, 1, 1)
    else:
        shape, lshape = (B, 13, 6), (B, 13, 1)
    x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    s = 0.2 + 0.6 * torch.rand(lshape, generator=g, dtype=torch.float64)
    t = torch.randint(100, 999, lshape, generator=g)
    seeds = torch.arange(500, 500 + B)
    full = _ops_keyed_layout(x, m, seeds, 9, s, t)
    for rows in (torch.tensor([4, 1, 3, 0, 2]), torch.arange(0, 2), torch.arange(2, 5),
                 *(torch.tensor([b]) for b in range(B))):
        part = _ops_keyed_layout(x[rows], m[rows], seeds[rows], 9, s[rows], t[rows])
        for k in full:
            assert torch.equal(part[k], full[k][rows]), (k, rows.tolist())
