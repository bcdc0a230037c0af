"""Argument checks of the reference (fallback) path, and the conversions of Python values
that the public functions share with it.

The native ops check their arguments in C++ (csrc/torch/validate.h), for every caller;
this module makes the pure-PyTorch fallback (no extension, DIFFKERN_DISABLE_NATIVE=1, a
device without kernels) reject the same inputs with the same exception types, naming
the same arguments (tests/test_front_door.py runs one table through every path). The
reference math (reference.py) checks nothing.

Device mismatches raise :class:`MismatchError`, a ValueError (as the native ops raise)
that is also a TypeError for code written against diffkern <= 0.1. Mixed floating
dtypes are not an error: they promote as torch does.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .schedules import NoiseSchedule, default_schedule

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
VARIANCE_TYPES = {"fixed_small": 0, "fixed_large": 1}


def _compiling() -> bool:
    """Under torch.compile, value checks on tensors would be data-dependent guards (graph
    breaks); they run in eager mode, and the kernels turn bad indices into NaN, not reads
    out of bounds."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


class MismatchError(TypeError, ValueError):
    """Tensors that must agree in dtype or device do not. Both a TypeError and a ValueError,
    as numpy's AxisError is both a ValueError and an IndexError: either catch works."""


def check_x(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_like(x: torch.Tensor, other, name: str, *, broadcast: bool = True) -> torch.Tensor:
    """``other`` must be a floating tensor on x's device whose shape broadcasts to x's
    (its dtype may differ: the result promotes)."""
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(other).__name__}")
    if other.device != x.device:
        raise MismatchError(f"{name} is on {other.device} but x is on {x.device}")
    if other.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {other.dtype}")
    if other.shape == x.shape:  # the common case; torch.broadcast_shapes costs ~20 us
        return other
    if broadcast:
        if not _broadcasts_to(other.shape, x.shape):
            raise ValueError(f"{name} of shape {tuple(other.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    elif other.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(other.shape)}")
    return other


def result_dtype(x: torch.Tensor, *others) -> torch.dtype:
    """torch's promotion over the floating inputs that enter the result (None skipped)."""
    dt = x.dtype
    for o in others:
        if o is not None and o.dtype != dt:
            dt = torch.promote_types(dt, o.dtype)
    return dt


def output_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last stays channels_last; every other layout gives contiguous outputs (the
    native ops' rule, csrc/torch/validate.cpp output_format)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _broadcasts_to(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target), strict=False))


def level_shape(v: torch.Tensor, x: torch.Tensor, name: str) -> tuple:
    """The one shape rule of noise levels and timesteps: the shape (x.ndim long) that the
    tensor ``v`` takes against x, or a ValueError naming ``name``.

    - 0-d: shared by the batch;
    - 1-D of length 1 or B = x.shape[0]: per sample, aligned with x's FIRST dim. torch's
      broadcasting would align it with x's last dim; a (B,) level is per sample here
      because that is what every sampler loop passes;
    - 2 <= ndim <= x.ndim: torch's broadcasting (right-aligned, each dim 1 or x's), e.g.
      per frame (B, 1, F, 1, 1) of a video latent or per token (B, N, 1)."""
    nd = x.dim()
    if v.dim() <= 1:
        n = v.numel()
        if v.dim() == 1 and n != 1 and n != _batch(x):
            raise ValueError(f"{name} has {n} entries but x has batch size {_batch(x)}")
        return (n,) + (1,) * (nd - 1) if nd > 0 else ()
    if not _broadcasts_to(v.shape, x.shape):
        raise ValueError(f"{name} of shape {tuple(v.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    return (1,) * (nd - v.dim()) + tuple(v.shape)


def aligned(v: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``v`` viewed in its :func:`level_shape` against x: two levels in different layouts
    (a (B,) sigma beside a per-frame sigma_next) then compare elementwise under torch's
    broadcasting."""
    return v.reshape(level_shape(v, x, name))


_int_t_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _int_timestep_tensor(tv: int, device: torch.device) -> torch.Tensor:
    """A (1,) int64 tensor for a Python-int timestep, cached per device: a sampling loop
    then pays neither the tensor construction nor a host-to-device copy per step. The
    cached tensors are never written to."""
    key = (tv, device)
    tt = _int_t_cache.get(key)
    if tt is None:
        if len(_int_t_cache) > 8192:
            _int_t_cache.clear()
        with torch.inference_mode(False):  # a cached inference tensor could not be saved for backward later
            tt = torch.tensor([tv], dtype=torch.int64, device=device)
        _int_t_cache[key] = tt
    return tt


def check_schedule(schedule) -> NoiseSchedule:
    if schedule is None:
        return default_schedule()
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a diffkern.NoiseSchedule or None, got {type(schedule).__name__}")
    return schedule


def _batch(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 0 else 1


def _as_int(t) -> int | None:
    """A Python int for an int or a one-element integer CPU tensor (outside torch.compile,
    where reading it would be a graph break), else None. A sampling loop's scalar tensor
    t then takes the int path: a cached device tensor, no per-call tensor ops."""
    if isinstance(t, bool):
        return None
    if isinstance(t, numbers.Integral):
        return int(t)
    if (isinstance(t, torch.Tensor) and t.is_cpu and t.dtype in _INT_DTYPES and t.numel() == 1 and t.dim() <= 1
            and not _compiling()):
        return int(t)
    return None


_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def int_timestep(tv: int, T: int, name: str = "t", *, allow_negative: bool = False) -> int:
    """Range check of a Python-int timestep (the native ops check tensors; an int the public
    face turns into a cached device tensor is checked here, before that)."""
    if tv >= T or (tv < 0 and not allow_negative):
        lo = -1 if allow_negative else 0
        raise ValueError(f"{name}={tv} is outside [{lo}, {T}) for a schedule of {T} timesteps")
    return max(tv, -1)


def check_timesteps(t, x: torch.Tensor, T: int, name: str = "t", *, allow_negative: bool = False) -> torch.Tensor:
    """A Python int or an integer tensor in a layout of :func:`level_shape` (0-d, (B,),
    or broadcasting to x's shape), on the CPU or on x's device -> a contiguous int64
    tensor on x's device: (1,) for an int or a 0-d tensor, else t's shape.

    Range checks run on the host only when t is already there; a t on the GPU is not
    copied back (that would stall the stream), and the math turns an out-of-range entry
    into NaN output instead of reading out of bounds."""
    return _move(check_timesteps_host(t, x, T, name, allow_negative=allow_negative), x)


def _move(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device, non_blocking=True) if t.device != x.device else t


def check_timesteps_host(t, x: torch.Tensor, T: int, name: str = "t", *, allow_negative: bool = False):
    """check_timesteps without the final move to x's device (t_prev is compared with t on
    the host first)."""
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got a bool")
    tv = _as_int(t)
    if tv is not None:
        return _int_timestep_tensor(int_timestep(tv, T, name, allow_negative=allow_negative), torch.device("cpu"))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype} (timesteps are indices)")
    level_shape(t, x, name)
    if t.device.type != "cpu" and t.device != x.device:
        raise MismatchError(f"{name} is on {t.device} but x is on {x.device}")
    if t.device.type == "cpu" and t.numel() and not _compiling():
        lo, hi = (int(v) for v in torch.aminmax(t))  # one pass; this check runs on every call
        if hi >= T or (lo < 0 and not allow_negative):
            raise ValueError(
                f"{name} has entries outside [{-1 if allow_negative else 0}, {T}) (min {lo}, max {hi}) for a schedule "
                f"of {T} timesteps")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dtype != torch.int64 or not t.is_contiguous():  # e.g. t[None].expand(B): stride 0
        t = t.to(torch.int64).contiguous()
    if allow_negative and t.device.type == "cpu":
        t = t.clamp_min(-1)
    return t


def check_t_prev(t_prev, t: torch.Tensor, x: torch.Tensor, T: int, t_raw=None) -> torch.Tensor:
    """``t_prev`` validated like ``t`` (negative means the final step) and checked to be
    below ``t`` elementwise, in the two layouts aligned against x, wherever both are on
    the host (``t`` as check_timesteps_host returned it, before any move to x's device:
    the check holds for CUDA x too)."""
    if t_prev is None:
        return t - 1
    # The range first, then the order: the native check's order, so both paths name the
    # same violated bound when both are violated.
    tp = check_timesteps_host(t_prev, x, T, "t_prev", allow_negative=True)
    tp_int, t_int = _as_int(t_prev), _as_int(t_raw)
    ints = tp_int is not None and t_int is not None
    if ints and tp_int >= t_int:
        raise ValueError(_T_PREV_ORDER)
    if not ints and tp.device.type == "cpu" and t.device.type == "cpu" and not _compiling():
        if bool((aligned(tp, x, "t_prev") >= aligned(t, x, "t")).any()):
            raise ValueError(_T_PREV_ORDER)
    return tp


_T_PREV_ORDER = "t_prev must be smaller than t (sampling goes from noise towards data)"


def check_nonneg(v, name: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        if v.device.type != "cpu":
            # .item() would wait for the device (and break CUDA-graph capture)
            raise TypeError(f"{name} must be a Python number or a CPU tensor, got a tensor on {v.device}; "
                            f"reading it would synchronize with the device")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not (v >= 0 and math.isfinite(v)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return v


def check_positive(v, name: str) -> float:
    v = check_nonneg(v, name)
    if v == 0:
        raise ValueError(f"{name} must be > 0")
    return v


def check_prediction_type(p) -> int:
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {p!r}")
    return PREDICTION_TYPES[p]


def check_variance(v) -> int:
    if v not in VARIANCE_TYPES:
        raise ValueError(f"variance must be one of {sorted(VARIANCE_TYPES)}, got {v!r}")
    return VARIANCE_TYPES[v]


def check_clip(c) -> float | None:
    if c is None or c is False:
        return None
    if c is True:
        return 1.0  # diffusers' clip_sample_range default
    c = check_nonneg(c, "clip_sample")
    if c == 0:
        raise ValueError("clip_sample must be > 0 (or None for no clipping)")
    return c


def check_generator(generator, x: torch.Tensor, noise) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if noise is not None:
        raise ValueError("pass either noise or generator, not both")
    if generator.device.type != "cpu" and generator.device.type != x.device.type:
        raise MismatchError(f"generator is on {generator.device} but x is on {x.device}")


class StepArgs:
    """A step's converted arguments: t (and t_prev) as int64 tensors on x's device, the
    float32 alphas_cumprod table there, the prediction code, the clip bound or None."""

    __slots__ = ("t", "t_prev_arg", "table", "prediction", "clip", "schedule")

    @property
    def t_prev(self):
        """The validated t_prev, or t - 1 (formed only when asked: the native ops form it
        themselves, and each small tensor op costs microseconds per step)."""
        return self.t - 1 if self.t_prev_arg is None else self.t_prev_arg


def step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator):
    """The checked arguments of a DDPM/DDIM step on the reference path."""
    check_x(x)
    check_like(x, eps, "eps")
    sched = check_schedule(schedule)
    T = sched.num_timesteps
    a = StepArgs()
    a.schedule = sched
    t_int = _as_int(t)
    t = t if t_int is None else t_int
    t_host = check_timesteps_host(t, x, T)
    if t_prev is not None:
        tp_int = _as_int(t_prev)
        t_prev = t_prev if tp_int is None else tp_int
    tp = None if t_prev is None else check_t_prev(t_prev, t_host, x, T, t)
    a.prediction = check_prediction_type(prediction_type)
    a.clip = check_clip(clip_sample)
    if noise is not None:
        check_like(x, noise, "noise")
    check_generator(generator, x, noise)
    check_zero_snr(sched, t_host if t_int is None else t_int, a.prediction)
    a.t = _move(t_host, x)
    a.t_prev_arg = None if tp is None else _move(tp, x)
    a.table = sched.table(x.device)
    return a


def check_zero_snr(schedule: NoiseSchedule, t, prediction: int) -> None:
    """Epsilon prediction divides by sqrt(alphas_cumprod[t]); with a zero-terminal-SNR
    schedule that is 0 at the last t (diffusers returns inf/NaN there). Checked where t is
    on the host (an int or a CPU tensor); a device t is not read back (no sync, graph
    capture keeps working): the math and the kernels make those samples NaN."""
    if prediction != PREDICTION_TYPES["epsilon"] or not schedule.has_zero_terminal_snr:
        return
    last = schedule.num_timesteps - 1
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu" or _compiling():
            return
        hit = bool((t == last).any())
    else:
        hit = t == last
    if hit:
        raise ValueError(
            "epsilon prediction is undefined at the last timestep of a zero-terminal-SNR schedule "
            "(alphas_cumprod[t] == 0); use prediction_type='v_prediction' or 'sample'")


def check_sigmas(sigmas, x: torch.Tensor) -> torch.Tensor:
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.detach().to("cpu", torch.float64).reshape(-1)
    else:
        try:
            s = torch.tensor(list(sigmas), dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError("sigmas must be a 1-D sequence or tensor of positive floats") from None
    if s.numel() == 0:
        raise ValueError("sigmas must not be empty")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas must be positive and finite")
    if s.numel() > 1 and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly descending (largest noise level first)")
    return s


def check_steps(n, name: str) -> int:
    """At least one step per level, for annealed_langevin and gmm_annealed_langevin alike
    (a chain of zero steps is nearly always a rounding mistake in n_total // levels)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


@dataclass
class Mixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor    # (K, D)
    stds: torch.Tensor     # (K, D)


def check_mixture(x: torch.Tensor, weights, means, stds) -> Mixture:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, v in (("weights", weights), ("means", means), ("stds", stds)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.device != x.device:
            raise MismatchError(f"{name} is on {v.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("x must have a last dimension D (points are x[..., :D])")
    D = x.shape[-1]
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"weights must have shape (K,), got {tuple(weights.shape)}")
    K = weights.numel()
    if means.shape != (K, D):
        raise ValueError(f"means must have shape (K, D) = ({K}, {D}), got {tuple(means.shape)}")
    if stds.shape == (K,):
        stds = stds[:, None].expand(K, D)
    elif stds.shape != (K, D):
        raise ValueError(f"stds must have shape (K, D) = ({K}, {D}) or (K,) = ({K},), got {tuple(stds.shape)}")
    w64 = weights.detach().double()
    if bool((w64 < 0).any()) or abs(float(w64.sum()) - 1.0) > 1e-4:
        raise ValueError("weights must be non-negative and sum to 1")
    if not bool((stds.detach() > 0).all()):
        raise ValueError("stds must be positive")
    return Mixture(weights.to(dt), means.to(dt), stds.to(dt).contiguous())


def check_sigma(sigma) -> float:
    return check_nonneg(sigma, "sigma")


# ---- sampler families: per-sample noise levels and model outputs ----------------------
def check_operand(x: torch.Tensor, other, name: str) -> torch.Tensor:
    """A model output (or proposal) for the sampler-family ops: a floating tensor on x's
    device whose shape broadcasts to x's. Its dtype may differ from x's (a float16 model
    beside a float32 state): the result promotes as torch does."""
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(other).__name__}")
    if other.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {other.dtype}")
    if other.device != x.device:
        raise MismatchError(f"{name} is on {other.device} but x is on {x.device}")
    if other.shape != x.shape and not _broadcasts_to(other.shape, x.shape):
        raise ValueError(f"{name} of shape {tuple(other.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    return other


def check_noise_level(v, x: torch.Tensor, name: str, *, positive: bool = False, at_most_one: bool = False):
    """A noise level (sigma, sigma_next, ...): a real number, or a floating tensor on the
    CPU or on x's device in a layout of :func:`level_shape`: () or (1,) shared, (B,) per
    sample (B = x.shape[0], aligned with x's first dim), or 2 <= ndim <= x.ndim
    broadcasting to x's shape torch-style (per frame, per token, ...).

    Values must be finite and >= 0 (> 0 with ``positive``, where the op divides by them;
    <= 1 with ``at_most_one``), elementwise. Python numbers and CPU tensors are checked
    here; a tensor on x's device is not read back (that would stall the stream).

    Returns a Python float (also for a one-element CPU tensor that needs no gradient: the
    cheap path, and any one-element layout broadcasts alike); else a contiguous tensor on
    x's device: 1-D of length 1 or B for a 0-d/1-D level, the level's own shape for
    ndim >= 2."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise TypeError(f"{name} must be a real number or a floating tensor, got a bool")
    if isinstance(v, numbers.Real):
        f = float(v)
        _check_level_range(f, f, name, positive, at_most_one)
        return f
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a real number or a floating tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
    level_shape(v, x, name)
    if v.device.type != "cpu" and v.device != x.device:
        raise MismatchError(f"{name} is on {v.device} but x is on {x.device}")
    if v.device.type == "cpu" and not _compiling():
        if v.numel() == 1 and not v.requires_grad:
            f = float(v)
            _check_level_range(f, f, name, positive, at_most_one)
            return f
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite")
        if v.numel() > 0:  # a zero batch has no levels to range-check (aminmax has no identity)
            lo, hi = (float(u) for u in torch.aminmax(v.detach()))
            _check_level_range(lo, hi, name, positive, at_most_one)
    if v.dim() == 0:
        v = v.reshape(1)
    if not v.is_contiguous():
        v = v.contiguous()
    return v.to(x.device, non_blocking=True) if v.device != x.device else v


def _check_level_range(lo: float, hi: float, name: str, positive: bool, at_most_one: bool) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {lo if not math.isfinite(lo) else hi}")
    if positive and not lo > 0:
        raise ValueError(f"{name} must be > 0 (the step divides by it), got {lo}")
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got {lo}")
    if at_most_one and hi > 1:
        raise ValueError(f"{name} must be <= 1, got {hi}")


def host_levels(v, x: torch.Tensor):
    """A noise level as passed by the caller (already validated against x), as a float64
    CPU tensor in its :func:`level_shape` when its values are on the host (a Python
    number or a CPU tensor), else None (it lives on a device)."""
    if _compiling():
        return None
    if isinstance(v, numbers.Real):
        return torch.tensor(float(v), dtype=torch.float64)
    if isinstance(v, torch.Tensor) and v.device.type == "cpu":
        return aligned(v.detach().to(torch.float64), x, "level")
    return None


def check_level_order(lower, upper, x: torch.Tensor, message: str, *, strict: bool = False) -> None:
    """Raise ValueError(message) unless lower <= upper (lower < upper with ``strict``)
    elementwise over the two levels' layouts aligned against x, for levels known on the
    host; device-resident levels are not read."""
    if type(lower) is float and type(upper) is float:  # the common case, without tensors
        if (lower >= upper) if strict else (lower > upper):
            raise ValueError(message)
        return
    a, b = host_levels(lower, x), host_levels(upper, x)
    if a is None or b is None:
        return
    bad = (a >= b) if strict else (a > b)
    if bool(bad.any()):
        raise ValueError(message)
