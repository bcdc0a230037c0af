"""Counter-based noise: Philox4x32-10 and the normal transform, in pure PyTorch.

This is the oracle for the in-kernel generator (csrc/kernels/philox.h) and the noise
the reference ops draw, so a run gives the same numbers with or without the extension.

Keying (the same in C++ and CUDA): the i-th element (row-major logical index) of a call
keyed by ``(seed, offset)`` takes lane ``i % 4`` of
``philox4x32_10(counter=(c_lo, c_hi, g_lo, g_hi), key=(seed_lo, seed_hi))`` with
``c = offset // 4`` and ``g = i // 4``, turned into normals by Box-Muller on the lane pairs
(0,1), (2,3)::

    u = ((bits_a >> 9) + 0.5) * 2**-23     in (0, 1)
    v = (bits_b >> 9) * 2**-23             in [0, 1)
    z_a = sqrt(-2 log u) cos(2 pi v),  z_b = sqrt(-2 log u) sin(2 pi v)

log, sin and cos are the polynomial forms below, written once in C++ and mirrored here
op for op, so the native noise equals this up to floating-point contraction (FMA).

The counter layout is torch's: its CUDA kernels draw with
``curand_init(seed, subsequence=thread, offset)``, counter ``(offset/4 + k, thread)``.
Group ``g`` plays a thread and a call reserves 4 offsets of its own, so diffkern never
reuses counters an earlier ``torch.randn`` on the same generator drew.

Per-sample keys (``seeds=``, ``step=``): element ``j`` of sample ``b`` is element ``j`` of
the stream keyed by ``(seeds[b], 4 * step)`` with the group's top bit set
(``g = 2**63 + j // 4``), which no generator-driven call reaches (:func:`keyed_normal`).

Generator position:
- a CUDA generator gives ``(initial_seed, philox offset)`` and each call advances the
  offset by 4 (graph-safe, via torch's Philox state);
- a CPU generator (Mersenne Twister, no offset) gives two 64-bit words of its own
  stream, ``(seed, offset) = (random64(), random64())``, drawn under its lock. The noise
  is thus a function of the generator's state: ``g.set_state(s)`` or
  ``torch.random.fork_rng`` replays it, and concurrent callers get different words.
  The same seed no longer gives the same noise on a CPU and a CUDA generator; per-sample
  keys are the device-independent path.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
OFFSET_INCREMENT = 4  # per call; torch rounds Philox offset increments to multiples of 4


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (Salmon et al. 2011)."""
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        p0 = c0 * PHILOX_M0  # int64 product wraps mod 2^64; the shifts below recover hi/lo
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# Cephes-style single-precision polynomials; csrc/kernels/philox.h evaluates the same.
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
TWO_PI = 6.28318530717958647692


def _f32(v):
    return torch.tensor(v, dtype=torch.float32)


def _log_poly(u: torch.Tensor) -> torch.Tensor:
    bits = u.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x7FFFFF) | 0x3F000000).to(torch.int32).view(torch.float32)  # [0.5, 1)
    small = m < 0.707106781186547524
    e = torch.where(small, e - 1, e).to(torch.float32)
    m = torch.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = torch.full_like(m, _LOG_P[0])
    for c in _LOG_P[1:]:
        y = y * m + c
    y = y * m * z
    y = y + e * -2.12194440e-4
    y = y - 0.5 * z
    return m + y + e * 0.693359375


def _sincos_2pi(v: torch.Tensor):
    q = torch.floor(v * 4.0 + 0.5)
    a = (v - q * 0.25) * TWO_PI  # v - q/4 is exact: v has 23 fractional bits
    a2 = a * a
    s = torch.full_like(a, _SIN_P[0])
    for c in _SIN_P[1:]:
        s = s * a2 + c
    s = a + a * a2 * s
    c_ = torch.full_like(a, _COS_P[0])
    for c in _COS_P[1:]:
        c_ = c_ * a2 + c
    c_ = 1.0 - 0.5 * a2 + a2 * a2 * c_
    qi = q.to(torch.int64) & 3
    sin = torch.where(qi == 0, s, torch.where(qi == 1, c_, torch.where(qi == 2, -s, -c_)))
    cos = torch.where(qi == 0, c_, torch.where(qi == 1, -s, torch.where(qi == 2, -c_, s)))
    return sin, cos


def _box_muller(a: torch.Tensor, b: torch.Tensor):
    u = ((a >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    v = (b >> 9).to(torch.float32) * (2.0**-23)
    r = torch.sqrt(-2.0 * _log_poly(u))
    s, c = _sincos_2pi(v)
    return r * c, r * s


def philox_counter(offset: int, g: torch.Tensor):
    """The counter words of group(s) ``g`` (int64 tensor) of a call at ``offset``: torch's
    ``curand_init(seed, subsequence=g, offset)`` layout, ``(offset/4 lo, hi, g lo, g hi)``."""
    offset &= (1 << 64) - 1
    return (torch.full_like(g, (offset >> 2) & MASK32), torch.full_like(g, offset >> 34), g & MASK32,
            (g >> 32) & MASK32)


def philox_bits(seed: int, offset: int, g: torch.Tensor):
    """The four Philox words of group(s) ``g`` of the stream keyed by ``(seed, offset)``."""
    seed &= (1 << 64) - 1
    return philox4x32_10(*philox_counter(offset, g), torch.full_like(g, seed & MASK32), torch.full_like(g, seed >> 32))


def philox_normal(numel: int, seed: int, offset: int, *, start: int = 0, device=None) -> torch.Tensor:
    """Float32 normals for logical indices ``start .. start+numel-1`` of the stream keyed by
    ``(seed, offset)`` (both taken mod 2^64)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    g0 = start // 4
    g1 = (start + numel - 1) // 4 + 1
    # groups mod 2^64 in int64 (the addition wraps; arange alone would overflow past 2^63)
    g = torch.arange(0, g1 - g0, dtype=torch.int64, device=device) + _to_int64(g0)
    r0, r1, r2, r3 = philox_bits(seed, offset, g)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    z = torch.stack([z0, z1, z2, z3], dim=1).flatten()
    lo = start - 4 * g0
    return z[lo:lo + numel]


def keyed_normal(seeds: torch.Tensor, step: int, inner: int, *, start: int = 0, numel: int | None = None,
                 device=None) -> torch.Tensor:
    """Float32 normals of shape ``(B, numel)`` under per-sample keys: row ``b`` holds
    elements ``start .. start+numel-1`` of sample ``b`` keyed by ``(seeds[b], step)``.
    ``inner`` (elements per sample) does not change the values; it is the default numel."""
    device = torch.device(device) if device is not None else seeds.device
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1, 1)
    numel = inner - start if numel is None else numel
    B = seeds.shape[0]
    if numel <= 0 or B == 0:
        return torch.empty(B, max(numel, 0), dtype=torch.float32, device=device)
    g0 = start // 4
    g1 = (start + numel - 1) // 4 + 1
    g = torch.arange(g0, g1, dtype=torch.int64, device=device).expand(B, -1)
    ctr = (int(step) & ((1 << 64) - 1)) & MASK32, ((int(step) & ((1 << 64) - 1)) >> 32) & 0x3FFFFFFF
    c0 = torch.full_like(g, ctr[0])
    c1 = torch.full_like(g, ctr[1])
    c2 = g & MASK32
    c3 = ((g >> 32) & MASK32) | 0x80000000  # kKeyedGroup: the top bit of the group
    k0 = (seeds & MASK32).expand_as(g)
    k1 = ((seeds >> 32) & MASK32).expand_as(g)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    z = torch.stack([z0, z1, z2, z3], dim=2).reshape(B, -1)
    lo = start - 4 * g0
    return z[:, lo:lo + numel]


# ---- generator -> (seed, offset) -------------------------------------------------
def _to_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


def cpu_generator_key(gen: torch.Generator | None) -> tuple[int, int]:
    """(seed, offset) for the next call drawing from a CPU generator: its next two 64-bit
    words (mt19937 ``random64()``, what ``random_(-2**63, None)`` on int64 draws), taken
    under the generator's lock. The native CPU ops draw the same words in C++
    (csrc/torch/common.h ``cpu_philox_key``)."""
    if gen is None:
        gen = torch.default_generator
    w = torch.empty(2, dtype=torch.int64).random_(-(1 << 63), None, generator=gen).tolist()
    return w[0] & ((1 << 64) - 1), w[1] & ((1 << 64) - 1)


def cuda_generator_key(gen: torch.Generator) -> tuple[int, int]:
    """(seed, offset) from a CUDA generator's Philox state, advancing it like the kernels do.
    Not usable under CUDA-graph capture (the native ops are)."""
    seed = gen.initial_seed()
    offset = gen.get_offset()
    gen.set_offset(offset + OFFSET_INCREMENT)
    return seed, offset


def default_cuda_generator(device: torch.device) -> torch.Generator:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[idx]


def generator_key(gen: torch.Generator | None, device: torch.device) -> tuple[int, int]:
    """(seed, offset) for a reference-path draw on ``device``."""
    if gen is None:
        gen = default_cuda_generator(device) if device.type == "cuda" else torch.default_generator
    if gen.device.type == "cuda":
        return cuda_generator_key(gen)
    if gen.device.type != "cpu":
        raise TypeError(f"generator must be a CPU or CUDA torch.Generator, got one on {gen.device}")
    return cpu_generator_key(gen)


def normal_like(shape, gen: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Noise of ``shape`` keyed by the generator's next position, as the native ops draw it."""
    device = torch.device(device)
    seed, offset = generator_key(gen, device)
    n = 1
    for s in shape:
        n *= int(s)
    return philox_normal(n, seed, offset, device=device).reshape(shape).to(dtype)
