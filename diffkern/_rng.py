"""Counter-based noise: Philox4x32-10 and the normal transform, in pure PyTorch.

This is the oracle for the in-kernel generator (csrc/kernels/philox.h) and the noise
the reference ops draw, so a run gives the same numbers with or without the extension.

Keying (the same in C++ and CUDA): the i-th element (row-major logical index) of a call
keyed by ``(seed, offset)`` takes lane ``i % 4`` of
``philox4x32_10(counter=(g_lo, g_hi, offset_lo, offset_hi), key=(seed_lo, seed_hi))``
with ``g = i // 4``, turned into normals by Box-Muller on the lane pairs (0,1), (2,3)::

    u = ((bits_a >> 9) + 0.5) * 2**-23     in (0, 1)
    v = (bits_b >> 9) * 2**-23             in [0, 1)
    z_a = sqrt(-2 log u) cos(2 pi v),  z_b = sqrt(-2 log u) sin(2 pi v)

log, sin and cos are the polynomial forms below, written once in C++ and mirrored here
op for op. The CPU kernels (built with -ffp-contract=off) equal this bitwise; CUDA
within a few ulps (nvcc contracts the polynomials into FMAs).

Generator position: a CUDA generator gives ``(initial_seed, philox offset)`` and each
call advances the offset by 4 (graph-safe, via torch's Philox state). A CPU generator
has no offset, so diffkern keeps one beside it: it restarts at 0 whenever the
generator's state is what ``manual_seed(initial_seed)`` leaves, and continues from the
last call otherwise. The same seed thus gives the same noise on the CPU and on CUDA.
"""

from __future__ import annotations

import weakref

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
    # sqrt in float64, then rounded: torch's vectorized float32 sqrt (Sleef, <= 0.5001 ulp)
    # is not always correctly rounded, and the kernels' sqrtf is; rounding the float64
    # root is (it carries more than 2*24 + 2 bits). This made 10198 of 65536 normals
    # differ by 1 ulp on an AVX-512 host.
    r = torch.sqrt((-2.0 * _log_poly(u)).double()).float()
    s, c = _sincos_2pi(v)
    return r * c, r * s


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
    g = torch.arange(g0, g1, dtype=torch.int64, device=device)
    c0 = g & MASK32
    c1 = (g >> 32) & MASK32
    c2 = torch.full_like(g, offset & MASK32)
    c3 = torch.full_like(g, offset >> 32)
    k0 = torch.full_like(g, seed & MASK32)
    k1 = torch.full_like(g, seed >> 32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    z = torch.stack([z0, z1, z2, z3], dim=1).flatten()
    lo = start - 4 * g0
    return z[lo:lo + numel]


# ---- generator -> (seed, offset) -------------------------------------------------
_fresh_states: dict[int, torch.Tensor] = {}


class _Positions:
    """generator -> (its state after our last draw, next offset). Weak references where
    torch.Generator supports them (torch >= 2.12); otherwise a bounded map by id that
    holds the generator itself, so an id cannot be reused while its entry lives."""

    def __init__(self, limit: int = 1024):
        self._weak: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple] = {}
        self._limit = limit

    def get(self, gen):
        try:
            return self._weak.get(gen)
        except TypeError:
            entry = self._strong.get(id(gen))
            return entry[1] if entry is not None and entry[0] is gen else None

    def __setitem__(self, gen, value):
        try:
            self._weak[gen] = value
        except TypeError:
            if len(self._strong) >= self._limit:
                self._strong.pop(next(iter(self._strong)))
            self._strong.pop(id(gen), None)
            self._strong[id(gen)] = (gen, value)


_cpu_positions = _Positions()


def _fresh_state(seed: int) -> torch.Tensor:
    st = _fresh_states.get(seed)
    if st is None:
        st = torch.Generator().manual_seed(seed).get_state()
        if len(_fresh_states) > 64:
            _fresh_states.clear()
        _fresh_states[seed] = st
    return st


def _to_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


# The extension's C++ keying (csrc/torch/cpu_generator.cpp), set by diffkern._native when
# it loads: the same rule without Python, and one table of generator positions for the
# native ops and the reference alike.
_native_key = None


def cpu_generator_key(gen: torch.Generator | None) -> tuple[int, int]:
    """(seed, offset) for the next call drawing from a CPU generator; advances it."""
    if _native_key is not None:
        return _native_key(gen)
    return py_cpu_generator_key(gen)


def py_cpu_generator_key(gen: torch.Generator | None) -> tuple[int, int]:
    """cpu_generator_key in Python (used without the extension)."""
    if gen is None:
        gen = torch.default_generator
    seed = gen.initial_seed()
    state = gen.get_state()
    last = _cpu_positions.get(gen)
    if last is not None and torch.equal(last[0], state):
        offset = last[1]
    elif torch.equal(state, _fresh_state(seed)):
        offset = 0
    else:
        # Used elsewhere since our last call: jump to a fresh region drawn from it, so the
        # noise stays a function of the generator's state and never repeats an earlier call's.
        offset = int(torch.randint(0, 1 << 60, (1,), generator=gen)) * OFFSET_INCREMENT
    # Step the Mersenne state once so "our last state" never equals a freshly seeded one:
    # that is how a later manual_seed(seed) is told apart from "continue".
    torch.randint(0, 2, (1,), generator=gen)
    _cpu_positions[gen] = (gen.get_state(), offset + OFFSET_INCREMENT)
    return seed, offset


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
