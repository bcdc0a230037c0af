"""In-kernel noise: Philox4x32-10 known answers, the pure-torch oracle, statistics of the
native draws, reproducibility and generator bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, needs_cuda, needs_native, randn

import diffkern as dk
from diffkern import _rng

N = 1_000_000


def _noise(x, g, t=500):
    """The native in-kernel noise for x's shape (q_sample returns the z it drew)."""
    _, z = dk.q_sample(x, t, generator=g)
    return z


def _key(g: torch.Generator) -> tuple[int, int]:
    """The key the next diffkern call on a CPU generator in g's state uses (g unchanged)."""
    return _rng.cpu_generator_key(torch.Generator().set_state(g.get_state()))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---- Philox known answers (DESIGN.md §4, Salmon et al. 2011) -----------------------------
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ctr, key, expected):
    args = [torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)]
    out = _rng.philox4x32_10(*args)
    assert tuple(int(o) for o in out) == expected


def test_philox_vectorized_matches_scalar():
    """A batch of counters gives what each counter gives alone (no cross-lane mixing)."""
    g = torch.tensor([0, 1, 2**32 - 1, 2**32, 12345678901], dtype=torch.int64)
    c0, c1 = g & 0xFFFFFFFF, g >> 32
    c2 = torch.full_like(g, 7)
    c3 = torch.full_like(g, 0x1234)
    k0, k1 = torch.full_like(g, 0xDEADBEEF), torch.full_like(g, 42)
    batch = torch.stack(_rng.philox4x32_10(c0, c1, c2, c3, k0, k1), 1)
    for i in range(g.numel()):
        one = torch.stack(_rng.philox4x32_10(c0[i:i + 1], c1[i:i + 1], c2[i:i + 1], c3[i:i + 1], k0[i:i + 1],
                                             k1[i:i + 1]), 1)
        assert torch.equal(one[0], batch[i])
    assert bool(((batch >= 0) & (batch <= 0xFFFFFFFF)).all())


def test_philox_normal_start_offsets_are_consistent():
    full = _rng.philox_normal(103, seed=99, offset=8)
    for start, n in ((0, 1), (1, 5), (3, 9), (50, 53), (101, 2)):
        assert torch.equal(_rng.philox_normal(n, 99, 8, start=start), full[start:start + n])
    assert full.dtype == torch.float32 and bool(torch.isfinite(full).all())


def test_philox_normal_box_muller_lanes():
    """Lanes (0,1) and (2,3) of a group are Box-Muller pairs of the Philox words."""
    seed, offset = 0x0123456789ABCDEF, 12
    z = _rng.philox_normal(8, seed, offset)
    for grp in (0, 1):
        words = _rng.philox4x32_10(*(torch.tensor([v], dtype=torch.int64) for v in (
            offset >> 2, 0, grp, 0, seed & 0xFFFFFFFF, seed >> 32)))
        words = [int(w) for w in words]
        for lane in (0, 2):
            a, b = words[lane], words[lane + 1]
            u = ((a >> 9) + 0.5) * 2.0**-23
            v = (b >> 9) * 2.0**-23
            r = math.sqrt(-2 * math.log(u))
            assert z[4 * grp + lane].item() == pytest.approx(r * math.cos(2 * math.pi * v), abs=2e-6)
            assert z[4 * grp + lane + 1].item() == pytest.approx(r * math.sin(2 * math.pi * v), abs=2e-6)


def test_philox_normal_polynomials_accurate():
    """The Cephes log/sincos forms against float64 libm over the whole (u, v) grid range."""
    a = torch.arange(0, 2**23, 97, dtype=torch.int64) << 9
    u = ((a >> 9).to(torch.float32) + 0.5) * 2.0**-23
    lg = _rng._log_poly(u).double()
    assert (lg - torch.log(u.double())).abs().max().item() <= 2e-7 * 17  # |log u| <= 16.6
    v = (a >> 9).to(torch.float32) * 2.0**-23
    s, c = _rng._sincos_2pi(v)
    assert (s.double() - torch.sin(2 * math.pi * v.double())).abs().max().item() <= 3e-7
    assert (c.double() - torch.cos(2 * math.pi * v.double())).abs().max().item() <= 3e-7


# ---- native noise == the pure-torch oracle ----------------------------------------------
@needs_native
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**63 + 5, 2**64 - 1])
def test_native_noise_matches_philox_normal(seed):
    n = 4 * 2048 + 7  # several chunks and a ragged tail
    x = randn(n, seed=3)
    g = gen(seed)
    ref = _rng.philox_normal(n, *_key(g))
    z = _noise(x, g)
    assert z.dtype == torch.float32
    assert (z - ref).abs().max().item() <= 1e-5


@needs_native
def test_successive_calls_use_successive_generator_words():
    """Call k is keyed by the generator's words 2k, 2k+1 (what random_(-2**63, None) draws)."""
    x = randn(1000, seed=4)
    g = gen(77)
    draws = [_noise(x, g) for _ in range(3)]
    words = torch.empty(6, dtype=torch.int64).random_(-(1 << 63), None, generator=gen(77)).tolist()
    for k, z in enumerate(draws):
        key = words[2 * k] % 2**64, words[2 * k + 1] % 2**64
        assert (z - _rng.philox_normal(1000, *key)).abs().max().item() <= 1e-5
    g2 = gen(77)
    torch.empty(6, dtype=torch.int64).random_(-(1 << 63), None, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())  # 3 calls consumed exactly 6 words


@needs_native
@pytest.mark.parametrize("op", ["ddim", "ddpm", "langevin", "ddim_ps"])
def test_every_op_draws_the_documented_stream(op):
    """Solve each op's output for its z and compare with philox_normal at the generator's key."""
    B, n = 4, 3001
    x = randn(B, n, dtype=torch.float64, seed=5)
    m = randn(B, n, dtype=torch.float64, seed=6)
    seed = 31337
    key = _key(gen(seed))
    if op == "ddim":
        out = dk.ddim_step(x, m, 600, 1.0, t_prev=550, generator=gen(seed))
        ac = dk.NoiseSchedule.linear().alphas_cumprod.double()
        ab, abp = float(ac[600]), float(ac[550])
        var = (1 - abp) / (1 - ab) * (1 - ab / abp)
        x0 = (x - math.sqrt(1 - ab) * m) / math.sqrt(ab)
        mean = math.sqrt(abp) * x0 + math.sqrt(1 - abp - var) * m
        z = (out - mean) / math.sqrt(var)
    elif op == "ddim_ps":
        t = torch.tensor([900, 500, 100, 10])
        out = dk.ddim_step(x, m, t, 1.0, generator=gen(seed))
        ref_noise = _rng.philox_normal(B * n, *key).reshape(B, n).double()
        expected = dk.ddim_step(x, m, t, 1.0, noise=ref_noise)
        assert (out - expected).abs().max().item() <= 1e-5
        return
    elif op == "ddpm":
        out = dk.ddpm_step(x, m, 600, generator=gen(seed))
        z1 = randn(B, n, dtype=torch.float64, seed=8)
        z2 = randn(B, n, dtype=torch.float64, seed=9)
        a, b = dk.ddpm_step(x, m, 600, noise=z1), dk.ddpm_step(x, m, 600, noise=z2)
        std = ((a - b) / (z1 - z2)).median()
        mean = a - std * z1
        z = (out - mean) / std
    else:
        step = 0.05
        out = dk.langevin_step(x, m, step, generator=gen(seed))
        z = (out - x - step * m) / math.sqrt(2 * step)
    ref = _rng.philox_normal(B * n, *key).reshape(B, n).double()
    assert (z - ref).abs().max().item() <= 1e-5


# ---- statistics ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_noise():
    if not dk.native_available():
        pytest.skip("native ops not built")
    x = randn(1000, 1000, seed=11)
    return _noise(x, gen(2024)).flatten()


@needs_native
def test_noise_moments(big_noise):
    z = big_noise.double()
    n = z.numel()
    assert n == N and bool(torch.isfinite(z).all())
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    p_tail = 2 * 0.5 * math.erfc(3 / math.sqrt(2))  # P(|z| > 3)
    frac = (z.abs() > 3).double().mean().item()
    assert abs(frac - p_tail) < 5 * math.sqrt(p_tail * (1 - p_tail) / n)


@needs_native
def test_noise_ks_normal(big_noise):
    stats = pytest.importorskip("scipy.stats", reason="scipy for the KS test")
    res = stats.kstest(big_noise.double().numpy(), "norm")
    assert res.pvalue > 1e-3, res
    # the test is sharp enough to see a 1% scale error at this n
    assert stats.kstest((1.01 * big_noise.double()).numpy(), "norm").pvalue < 1e-3


@needs_native
@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 2048])
def test_noise_neighbours_uncorrelated(big_noise, lag):
    z = big_noise
    n = z.numel() - lag
    assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(n)
    # squares too (Box-Muller pairs share a radius; independent normals have uncorrelated squares)
    assert abs(_corr(z[:-lag] ** 2, z[lag:] ** 2)) < 5 / math.sqrt(n)


@needs_native
def test_noise_lanes_each_standard_normal(big_noise):
    """Each of the 4 Philox lanes (sin and cos branches) is N(0, 1) on its own."""
    z = big_noise.double().reshape(-1, 4)
    n = z.shape[0]
    for lane in range(4):
        c = z[:, lane]
        assert abs(c.mean().item()) < 5 / math.sqrt(n)
        assert abs(c.var().item() - 1) < 5 * math.sqrt(2 / n)


@needs_native
def test_successive_calls_independent():
    x = randn(500, 1000, seed=12)
    g = gen(5)
    a, b = _noise(x, g), _noise(x, g)
    assert not torch.equal(a, b)
    assert abs(_corr(a, b)) < 5 / math.sqrt(a.numel())


@needs_native
def test_same_seed_reproducible_different_seed_differs():
    x = randn(300, 700, seed=13)
    a = _noise(x, gen(9))
    b = _noise(x, gen(9))
    c = _noise(x, gen(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(_corr(a, c)) < 5 / math.sqrt(a.numel())


@needs_native
def test_noise_independent_of_thread_count():
    x = randn(2**20 + 3, seed=14)
    m = randn(2**20 + 3, seed=15)
    torch.set_num_threads(1)  # the autouse fixture restores the count
    a = _noise(x, gen(21))
    la = dk.langevin_step(x, m, 0.1, generator=gen(22))
    torch.set_num_threads(2)
    b = _noise(x, gen(21))
    lb = dk.langevin_step(x, m, 0.1, generator=gen(22))
    assert torch.equal(a, b)
    assert torch.equal(la, lb)


@needs_native
def test_noise_independent_of_strides_and_dtype():
    """Noise is a function of the logical index, not of memory layout; wider/narrower
    dtypes get the same float32 draws, cast."""
    x = randn(64, 33, seed=16)
    base = _noise(x, gen(3))
    assert torch.equal(_noise(x.t().contiguous().t(), gen(3)), base)
    assert torch.equal(_noise(randn(64, 66, seed=17)[:, ::2], gen(3)), base)
    assert torch.equal(_noise(x.double(), gen(3)), base.double())
    assert torch.equal(_noise(x.half(), gen(3)), base.half())
    assert torch.equal(_noise(x.bfloat16(), gen(3)), base.bfloat16())


# ---- generator bookkeeping -------------------------------------------------------------
@needs_native
def test_manual_seed_reproduces_sequence():
    x = randn(4, 1000, seed=18)
    g = gen(123)
    a, b = _noise(x, g), _noise(x, g)
    g.manual_seed(123)
    a2, b2 = _noise(x, g), _noise(x, g)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)


@needs_native
def test_interleaved_torch_draw_changes_next_noise():
    x = randn(4, 1000, seed=19)
    g = gen(321)
    a, b = _noise(x, g), _noise(x, g)  # the undisturbed sequence
    g.manual_seed(321)
    a2 = _noise(x, g)
    torch.randn(3, generator=g)  # someone else uses the generator in between
    c = _noise(x, g)
    assert torch.equal(a, a2)
    assert not torch.equal(c, b) and not torch.equal(c, a)
    assert abs(_corr(c, b)) < 5 / math.sqrt(c.numel()) and abs(_corr(c, a)) < 5 / math.sqrt(c.numel())
    # still a function of the generator's state: the same history gives the same noise
    g.manual_seed(321)
    _noise(x, g)
    torch.randn(3, generator=g)
    assert torch.equal(_noise(x, g), c)
    # a draw right after manual_seed also moves the stream off its start
    g.manual_seed(321)
    torch.rand(1, generator=g)
    d = _noise(x, g)
    assert not torch.equal(d, a) and not torch.equal(d, b) and not torch.equal(d, c)


@needs_native
def test_no_repeats_in_an_interleaved_run():
    """From one seeding, calls mixed with other users of the generator never repeat."""
    x = randn(2, 512, seed=23)
    g = gen(654)
    seen = []
    for i in range(16):
        if i % 3 == 1:
            torch.randn(2, generator=g)
        elif i % 3 == 2:
            torch.rand(1, generator=g)
        z = _noise(x, g)
        for s in seen:
            assert not torch.equal(z, s), i
            assert abs(_corr(z, s)) < 6 / math.sqrt(z.numel()), i
        seen.append(z)


@needs_native
def test_default_generator_follows_torch_manual_seed():
    x = randn(2, 500, seed=20)
    torch.manual_seed(55)
    a = _noise(x, None)
    b = _noise(x, None)
    torch.manual_seed(55)
    a2 = _noise(x, None)
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert torch.equal(a, _noise(x, gen(55)))


def test_reference_draws_same_stream_as_oracle():
    """The reference ops (no native needed) use philox_normal with the same keying."""
    x = randn(3, 100, seed=21)
    _, z = dk.reference.q_sample(x, 10, generator=gen(8))
    assert torch.equal(z, _rng.philox_normal(300, *_key(gen(8))).reshape(3, 100))


# ---- counter layout: torch's ----------------------------------------------------------
def _curand_philox_first_draw(seed: int, subsequence: int, offset: int):
    """The words of the first curand4() after curand_init(seed, subsequence, offset) for
    Philox4_32_10, modelled after curand_kernel.h: the counter starts at 0, skipahead
    adds offset/4 to its low 64 bits, skipahead_sequence adds subsequence to its high 64."""
    lo, hi = (offset // 4) % 2**64, subsequence % 2**64
    words = [lo & 0xFFFFFFFF, lo >> 32, hi & 0xFFFFFFFF, hi >> 32, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]
    return tuple(int(w) for w in _rng.philox4x32_10(*(torch.tensor([w], dtype=torch.int64) for w in words)))


@pytest.mark.parametrize("seed,offset", [(0, 0), (42, 4), (2**64 - 1, 2**40 + 8), (0x0123456789ABCDEF, 2**63)])
def test_counter_layout_is_curand_init(seed, offset):
    """Group g of a call at `offset` draws what torch's CUDA thread g draws first after
    curand_init(seed, g, offset): the offset in the counter's low words, the group in the
    high ones."""
    groups = [0, 1, 5, 2**32 - 1, 2**32 + 3, 2**62 + 9]
    bits = _rng.philox_bits(seed, offset, torch.tensor(groups, dtype=torch.int64))
    for i, g in enumerate(groups):
        assert tuple(int(b[i]) for b in bits) == _curand_philox_first_draw(seed, g, offset)
    # and philox_normal is those words through Box-Muller, group by group
    z = _rng.philox_normal(8, seed, offset, start=4 * 5)
    a, b = _rng._box_muller(bits[0][2:3], bits[1][2:3])
    assert z[0].item() == a.item() and z[1].item() == b.item()


def test_counters_disjoint_from_earlier_torch_draws():
    """torch's kernels give thread t the counters (offset/4 + k, t), k < increment/4, for a
    call that reserves `increment` offsets; diffkern's next call (offset + increment) uses
    (offset/4 + increment/4, g) for every group g: never one of those. The old layout
    (group low, offset high) did reuse thread `offset`'s counters, as checked below."""
    seed, off, inc = 1234, 8, 12  # a torch call at offset 8 drawing 3 curand4 per thread
    threads = torch.arange(0, 4096, dtype=torch.int64)
    torch_words = set()
    for k in range(inc // 4):
        w = _rng.philox4x32_10(*_rng.philox_counter(off + 4 * k, threads), torch.full_like(threads, seed),
                               torch.zeros_like(threads))
        torch_words.update(zip(*(t.tolist() for t in w), strict=True))
    assert len(torch_words) == len(threads) * (inc // 4)
    ours = set(zip(*(t.tolist() for t in _rng.philox_bits(seed, off + inc, threads)), strict=True))
    assert not ours & torch_words
    # the old layout: counter (g lo, g hi, offset lo, offset hi) at offset 20 -> groups 0..2
    # were copies of thread 20's three draws
    g = threads
    old = _rng.philox4x32_10(g & 0xFFFFFFFF, g >> 32, torch.full_like(g, off + inc), torch.zeros_like(g),
                             torch.full_like(g, seed), torch.zeros_like(g))
    assert len(set(zip(*(t.tolist() for t in old), strict=True)) & torch_words) == inc // 4


def test_keyed_groups_disjoint_from_generator_groups():
    """Per-sample keys set the group's top bit: no generator-driven call reaches it."""
    seeds = torch.tensor([7, 2**40 + 1], dtype=torch.int64)
    z = _rng.keyed_normal(seeds, 3, 12)
    for b, s in enumerate(seeds.tolist()):
        assert torch.equal(z[b], _rng.philox_normal(12, s, 4 * 3, start=4 * 2**63))
        assert not torch.equal(z[b], _rng.philox_normal(12, s, 4 * 3))


# ---- CPU generators: the key is a function of the generator's state ---------------------
def _draw_all(x, g):
    """One draw through every noisy op (native when built), in a fixed order."""
    m = randn(*x.shape, seed=91)
    return [dk.q_sample(x, 321, generator=g)[1], dk.ddim_step(x, m, 500, 1.0, generator=g),
            dk.ddpm_step(x, m, 500, generator=g), dk.langevin_step(x, m, 0.01, generator=g),
            dk.reference.q_sample(x, 7, generator=g)[1]]


def test_get_state_set_state_replays():
    x = randn(3, 1001, seed=30)
    g = gen(17)
    _draw_all(x, g)
    s = g.get_state()
    first = _draw_all(x, g)
    torch.randn(5, generator=g)
    g.set_state(s)
    again = _draw_all(x, g)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for i in range(len(first)):  # and every call drew fresh noise
        for j in range(i):
            assert not torch.equal(first[i], first[j])


def test_fork_rng_reproduces_default_generator_draws():
    x = randn(2, 777, seed=31)
    torch.manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        a = _draw_all(x, None)
    b = _draw_all(x, None)  # fork_rng restored the state: the same calls draw the same noise
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = _draw_all(x, None)
    assert not torch.equal(c[0], b[0])


def test_gmm_chain_replays_from_generator_state():
    x = randn(50, 2, seed=32)
    w, mu, sd = torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.5, 1.0])
    sig = torch.tensor([1.0, 0.5])
    g = gen(3)
    s = g.get_state()
    a = dk.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=3, step_lr=0.05, generator=g)
    g.set_state(s)
    b = dk.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=3, step_lr=0.05, generator=g)
    ref = dk.reference.gmm_annealed_langevin(x, w, mu, sd, sig, n_steps_each=3, step_lr=0.05,
                                             generator=torch.Generator().set_state(s))
    assert torch.equal(a, b)
    assert (a - ref).abs().max().item() <= 1e-4


def test_threads_sharing_a_generator_never_share_noise():
    """Calls from several threads on one generator each take their own two words under
    the generator's lock: all noises differ, and together they used exactly the words of
    the calls made (no word lost or taken twice)."""
    import threading

    x = randn(1024, seed=33)
    g = gen(2718)
    n_threads, per_thread = 4, 12
    out: list[list[torch.Tensor]] = [[] for _ in range(n_threads)]

    def work(k):
        for _ in range(per_thread):
            out[k].append(_noise(x, g))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    calls = n_threads * per_thread
    words = torch.empty(2 * calls, dtype=torch.int64).random_(-(1 << 63), None, generator=gen(2718)).tolist()
    expected = torch.stack([_rng.philox_normal(64, words[2 * i] % 2**64, words[2 * i + 1] % 2**64)
                            for i in range(calls)])
    got = torch.stack([z[:64] for zs in out for z in zs])
    match = (got[:, None, :] - expected[None, :, :]).abs().amax(-1) <= 1e-5  # got i is expected j
    assert match.sum(1).tolist() == [1] * calls and match.sum(0).tolist() == [1] * calls
    g2 = gen(2718)
    torch.empty(2 * calls, dtype=torch.int64).random_(-(1 << 63), None, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())


def test_cpu_noise_independent_of_torch_randn_on_same_generator():
    x = randn(500, 1000, seed=34)
    g = gen(1)
    t = torch.randn(x.shape, generator=g)
    z = _noise(x, g)
    t2 = torch.randn(x.shape, generator=g)
    n = z.numel()
    for a, b in ((t, z), (z, t2), (t, t2)):
        assert abs(_corr(a, b)) < 5 / math.sqrt(n)


# ---- CUDA ------------------------------------------------------------------------------
@needs_cuda
def test_cuda_noise_is_the_documented_stream():
    x = randn(3, 70001, seed=22)
    g = gen(99, "cuda")
    first = _noise(x.cuda(), g)
    assert (first.cpu() - _rng.philox_normal(x.numel(), 99, 0).reshape(x.shape)).abs().max().item() <= 1e-5
    second = _noise(x.cuda(), g)  # successive CUDA calls advance the Philox offset by 4
    assert (second.cpu() - _rng.philox_normal(x.numel(), 99, 4).reshape(x.shape)).abs().max().item() <= 1e-5
    assert g.get_offset() == 8


@needs_cuda
def test_cuda_torch_randn_follows_the_modelled_layout():
    """The premise of the layout: torch.randn(n <= 256) on a CUDA generator is, for
    element t, the first curand_normal4 lane of thread t after curand_init(seed, t, 0),
    i.e. sqrt(-2 log u) sin(2 pi v) of the words (x, y) of counter (0, 0, t, 0)."""
    n, seed = 256, 4321
    g = gen(seed, "cuda")
    got = torch.randn(n, generator=g, device="cuda").double().cpu()
    t = torch.arange(n, dtype=torch.int64)
    w0, w1, _, _ = _rng.philox_bits(seed, 0, t)
    u = w0.double() * 2.0**-32 + 2.0**-33
    v = (w1.double() * 2.0**-32 + 2.0**-33) * 2 * math.pi
    want = torch.sqrt(-2 * torch.log(u)) * torch.sin(v)
    close = (got - want).abs() <= 1e-4 * (1 + want.abs())
    assert close.double().mean().item() >= 0.99, "torch's CUDA Philox layout differs from the model"


@needs_cuda
@pytest.mark.parametrize("torch_numel", [256, 70001, 3 * 2**20 + 5])
def test_cuda_noise_independent_of_torch_randn_on_same_generator(torch_numel):
    """Draw x_T with torch.randn, then diffkern's noise, on one CUDA generator: the noise is
    the stream at the generator's next offset and uncorrelated with x_T."""
    g = gen(2024, "cuda")
    xt = torch.randn(torch_numel, generator=g, device="cuda")
    off = g.get_offset()
    x = randn(2**20, seed=35).cuda()
    z = _noise(x, g)
    assert (z.cpu() - _rng.philox_normal(z.numel(), 2024, off)).abs().max().item() <= 1e-5
    n = min(torch_numel, z.numel())
    if n >= 4096:
        assert abs(_corr(xt[:n], z[:n])) < 5 / math.sqrt(n)
        assert abs(_corr(xt[:n] ** 2, z[:n] ** 2)) < 5 / math.sqrt(n)
    else:
        # One block: torch's element t is thread t's first draw (the test above). The old
        # layout made z[1] a copy of thread `off`'s, i.e. of x_T[off].
        assert abs(z[1].item() - xt[off].item()) > 1e-4
