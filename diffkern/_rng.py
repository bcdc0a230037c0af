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
op for op. The CPU kernels (built with -ffp-contract=off) equal this bitwise; CUDA
within a few ulps (nvcc contracts the polynomials into FMAs).

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

from . import _native

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


MAX_STEP = 1 << 62  # the step fills counter words 0-1 as offset/4 does (keyed_key: offset = 4 step)
X_T_STEP = MAX_STEP - 1  # the samplers' x_T under seeds= (keyed_randn(seeds, shape, step=X_T_STEP))


def keyed_normal(seeds: torch.Tensor, step, inner: int, *, start: int = 0, numel: int | None = None,
                 device=None) -> torch.Tensor:
    """Float32 normals of shape ``(B, numel)`` under per-sample keys: row ``b`` holds
    elements ``start .. start+numel-1`` of sample ``b`` keyed by ``(seeds[b], step)``
    (``seeds`` int64 (B,); ``step`` an int or a one-element int64 tensor, read with tensor
    ops, so a CUDA graph replays whatever step its buffer holds). ``inner`` (elements per
    sample) does not change the values; it is the default numel."""
    device = torch.device(device) if device is not None else seeds.device
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1, 1)
    numel = inner - start if numel is None else numel
    B = seeds.shape[0]
    if numel <= 0 or B == 0:
        return torch.empty(B, max(numel, 0), dtype=torch.float32, device=device)
    g0 = start // 4
    g1 = (start + numel - 1) // 4 + 1
    g = torch.arange(g0, g1, dtype=torch.int64, device=device).expand(B, -1)
    if isinstance(step, torch.Tensor):
        st = step.to(device=device, dtype=torch.int64).reshape(())
    else:
        st = torch.tensor(int(step) % MAX_STEP, dtype=torch.int64, device=device)
    c0 = (st & MASK32).expand_as(g)
    c1 = ((st >> 32) & 0x3FFFFFFF).expand_as(g)
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


# ---- per-sample keys: arguments and the draw ----------------------------------------
def check_seeds(seeds, B: int, device: torch.device) -> torch.Tensor:
    """``seeds=`` as an int64 tensor on ``device`` (x's): (1,) for an int (every sample),
    else (B,) (a CPU tensor is copied without a sync; a device one is used as it is, so a
    captured graph reads its buffer)."""
    if isinstance(seeds, bool):
        raise TypeError("seeds must be an int or an int64 tensor, got bool")
    if isinstance(seeds, int):
        if not -(1 << 63) <= seeds < (1 << 64):
            raise ValueError(f"seeds must fit in 64 bits, got {seeds}")
        return _int_tensor(_to_int64(seeds), device)
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds must be an int or an int64 tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {seeds.dtype}")
    if seeds.device.type != "cpu" and seeds.device != device:
        raise ValueError(f"seeds must be on the CPU or on x's device ({device}), got {seeds.device}")
    if seeds.dim() != 1:
        if seeds.dim() != 0:
            raise ValueError(f"seeds must be an int or a tensor of shape ({B},) (one per sample), "
                             f"got shape {tuple(seeds.shape)}")
        seeds = seeds.reshape(1)
    n = seeds.shape[0]
    if n != B and n != 1:
        raise ValueError(f"seeds must be an int or a tensor of shape ({B},) (one per sample), got shape ({n},)")
    return seeds if seeds.device == device else seeds.to(device, non_blocking=True)


def check_step(step, device: torch.device):
    """``step=`` as an int in [0, 2^62) or a one-element int64 tensor on ``device``."""
    if step is None:
        return 0
    if isinstance(step, bool):
        raise TypeError("step must be an int or a 0-d int64 tensor, got bool")
    if isinstance(step, int):
        if not 0 <= step < MAX_STEP:
            raise ValueError(f"step must be in [0, 2**62), got {step}")
        return step
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"step must be an int or a 0-d int64 tensor, got {type(step).__name__}")
    if step.dtype != torch.int64 or step.numel() != 1:
        raise TypeError(f"step must be an int or a 0-d int64 tensor, got {step.dtype} of shape {tuple(step.shape)}")
    if step.device.type != "cpu" and step.device != device:
        raise ValueError(f"step must be on the CPU or on x's device ({device}), got {step.device}")
    return step.reshape(()).to(device, non_blocking=True)


_int_tensors: dict = {}


def _int_tensor(v: int, device: torch.device) -> torch.Tensor:
    """A cached (1,) int64 tensor (never written to): an int seed costs no copy per call."""
    key = (v, device)
    t = _int_tensors.get(key)
    if t is None:
        if len(_int_tensors) > 4096:
            _int_tensors.clear()
        with torch.inference_mode(False):
            t = torch.tensor([v], dtype=torch.int64, device=device)
        _int_tensors[key] = t
    return t


_keyed_state = None


def keyed_op():
    """torch.ops.diffkern.keyed_normal (its fake kernel registered), or None without it:
    an extension built before the op existed still serves the rest (keyed noise then
    comes from the reference). Resolved on first use, when the extension has loaded."""
    global _keyed_state
    if _keyed_state is None:
        ok = _native.native_available() and hasattr(torch.ops.diffkern, "keyed_normal")
        if ok:
            _register_fake()
        _keyed_state = torch.ops.diffkern.keyed_normal.default if ok else False
    return _keyed_state or None


_native_devices: dict = {}


def _native_keyed(device: torch.device) -> bool:
    ok = _native_devices.get(device)
    if ok is None:
        ok = _native_devices[device] = keyed_op() is not None and _native.native_available(device)
    return ok


def keyed_randn(seeds, shape, *, step=0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normals of ``shape`` (B, ...) whose row ``b`` is sample ``b``'s stream keyed by
    ``(seeds[b], step)``: the same values as the noise an op draws with ``seeds=``,
    ``step=`` for an x of this shape (e.g. a sampler's x_T; give it a step the loop does
    not use)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have a leading (sample) dimension")
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    s = check_seeds(seeds, shape[0], device)
    st = check_step(step, device)
    inner = 1
    for d in shape[1:]:
        inner *= d
    return _keyed_draw(s, st, shape[0], inner, device).view(shape).to(dtype)


def _keyed_draw(seeds: torch.Tensor, step, B: int, inner: int, device, native: bool = True) -> torch.Tensor:
    """(B, inner) float32 keyed normals, by the native op when built for ``device``."""
    if native and _native_keyed(device):
        if isinstance(step, torch.Tensor):
            return _keyed_state(seeds, step, 0, B, inner)
        return _keyed_state(seeds, None, step, B, inner)
    return keyed_normal(seeds.expand(B) if seeds.numel() == 1 else seeds, step, inner)


def nonzero(v) -> bool:
    """Whether a stochastic-strength argument (eta, gamma) asks for noise; invalid values
    count as nonzero and are rejected by the op's own checks."""
    return not (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


class Keyed:
    """Per-sample keys (``seeds=``, ``step=``) once checked: what an op draws with in place of
    a generator. The kernels draw element ``j`` of sample ``b`` from ``(seeds[b], step)`` in
    their own pass; the reference draws the same numbers (:func:`normal_like`)."""

    __slots__ = ("seeds", "step")

    def __init__(self, seeds: torch.Tensor, step):
        self.seeds, self.step = seeds, step  # int64 (1,)/(B,) on x's device; int or 0-d int64 tensor

    def op_args(self) -> tuple:
        """(seeds, step_t, step) as the raw ops take them."""
        if isinstance(self.step, torch.Tensor):
            return self.seeds, self.step, 0
        return self.seeds, None, self.step


def keyed(x: torch.Tensor, seeds, step, generator=None, noise=None):
    """The ops' ``seeds=``/``step=`` front door: ``generator`` unchanged without seeds, else
    the checked keys (:class:`Keyed`), which exclude a generator and given noise."""
    if seeds is None:
        if step is not None:
            raise ValueError("step= needs seeds=")
        return generator
    if generator is not None:
        raise ValueError("pass either seeds or generator, not both")
    if noise is not None:
        raise ValueError("pass either seeds or noise, not both")
    return Keyed(check_seeds(seeds, x.shape[0] if x.dim() > 0 else 1, x.device), check_step(step, x.device))


def keyed_noise(x: torch.Tensor, seeds, step, generator=None, noise=None):
    """The keyed noise as a tensor of x's shape and dtype, for the samplers that add it
    themselves (ops draw it in their own pass: :class:`Keyed`); ``noise`` unchanged
    without seeds."""
    k = keyed(x, seeds, step, generator, noise)
    if not isinstance(k, Keyed):
        return noise
    B = x.shape[0] if x.dim() > 0 else 1
    z = _keyed_draw(k.seeds, k.step, B, x.numel() // B if B else 0, x.device).view(x.shape)
    return z if x.dtype == torch.float32 else z.to(x.dtype)


# ---- generator -> (seed, offset) -------------------------------------------------
def _to_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


def _register_fake():
    @torch.library.register_fake("diffkern::keyed_normal")
    def _(seeds, step_t, step, batch, inner):
        return seeds.new_empty((batch, inner), dtype=torch.float32)


def cpu_generator_key(gen: torch.Generator | None) -> tuple[int, int]:
    """(seed, offset) for the next call drawing from a CPU generator: its next two 64-bit
    words (mt19937 ``random64()``), taken under the generator's lock; advances it by them.
    With the extension, its C++ keying (csrc/torch/cpu_generator.cpp): the same rule
    without Python."""
    if _native.native_available() and _native._fast is not None:
        return _native._fast._cpu_generator_key(gen if gen is not None else torch.default_generator)
    return py_cpu_generator_key(gen)


def py_cpu_generator_key(gen: torch.Generator | None) -> tuple[int, int]:
    """cpu_generator_key in Python (used without the extension, and as its oracle):
    ``random_(-2**63, None)`` on two int64 draws exactly two ``random64()`` words, in
    order, under the generator's lock."""
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


def normal_like(shape, gen, device, dtype) -> torch.Tensor:
    """Noise of ``shape`` keyed by the generator's next position, or by per-sample keys
    (:class:`Keyed`, element ``j`` of sample ``b`` from ``(seeds[b], step)``), as the native
    ops draw it."""
    device = torch.device(device)
    if isinstance(gen, Keyed):
        B = int(shape[0]) if len(shape) else 1
        n = 1
        for s in shape:
            n *= int(s)
        z = _keyed_draw(gen.seeds, gen.step, B, n // B if B else 0, device, native=False)
        return z.reshape(shape).to(dtype)
    seed, offset = generator_key(gen, device)
    n = 1
    for s in shape:
        n *= int(s)
    return philox_normal(n, seed, offset, device=device).reshape(shape).to(dtype)

