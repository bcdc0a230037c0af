"""The public ops: convert the Python arguments into what the op schemas take, then run
the native op (which checks everything, in C++: csrc/torch/validate.h) or, where no
kernel is built for the input's device, the pure-PyTorch reference after the same checks
in Python (_validate.py). Same numbers either way, including the drawn noise.

A call is meant to cost about one torch op. In eager mode, with plain tensors, the step
ops enter the extension through its own module functions (csrc/torch/fast_call.cpp),
which call the same dispatcher op without torch.ops' Python layer; under torch.compile,
a TorchFunctionMode or tensor subclasses they go through torch.ops.diffkern.* (traceable).
Python ints become cached one-element tensors; enums become ints.

The fake (shape) functions follow at the end; autograd is C++ (csrc/torch/autograd.cpp).
"""

from __future__ import annotations

import numbers

import torch

from . import _native, _rng
from . import _validate as V
from . import reference as R
from ._native import native_available
from .schedules import NoiseSchedule, default_schedule

__all__ = ["q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
           "gmm_annealed_langevin"]

_NATIVE = native_available()
_ops = torch.ops.diffkern if _NATIVE else None
_F = _native._fast if _NATIVE else None  # eager entry points (None: not built, or a stale build)
_Tensor = torch.Tensor
_CPU = torch.device("cpu")
_CPU_TABLE_KEY = (_CPU, torch.float32)
_PRED = V.PREDICTION_TYPES
_VAR = V.VARIANCE_TYPES
_T_CACHE: dict[int, torch.Tensor] = {}
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
_tf_mode = torch._C._is_torch_function_mode_enabled


def _fast(x, m) -> bool:
    """The eager entry applies: extension built, CPU plain tensors, nothing to trace."""
    return (_F is not None and not _is_compiling() and type(x) is _Tensor and type(m) is _Tensor and x.is_cpu
            and not _tf_mode())


def _eager(x, m) -> bool:
    """The eager entry on any device with kernels (after the Python-side conversions)."""
    return _F is not None and not _is_compiling() and type(x) is _Tensor and type(m) is _Tensor and not _tf_mode()


def _use_native(x) -> bool:
    return _NATIVE and native_available(x.device)


# ---- conversions -------------------------------------------------------------------
def _cpu_table(schedule) -> torch.Tensor:
    s = default_schedule() if schedule is None else schedule
    if type(s) is not NoiseSchedule and not isinstance(s, NoiseSchedule):
        V.check_schedule(s)  # raises TypeError naming schedule
    tab = s._tables.get(_CPU_TABLE_KEY)
    return tab if tab is not None else s.table(_CPU)


def _t_cpu(t, name: str = "t"):
    """A timestep as the op takes it on the CPU: tensors as they are (the op checks them),
    ints as cached one-element tensors (never written to)."""
    if type(t) is int:
        tt = _T_CACHE.get(t)
        return tt if tt is not None else _t_new(t, name)
    if isinstance(t, _Tensor):
        return t
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        return _t_cpu(int(t), name)
    raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")


def _t_new(t: int, name: str) -> torch.Tensor:
    if not -(1 << 63) <= t < (1 << 63):
        raise ValueError(f"{name}={t} is outside the range of any schedule")
    if len(_T_CACHE) > 8192:
        _T_CACHE.clear()
    with torch.inference_mode(False):  # a cached inference tensor could not be saved for backward later
        tt = _T_CACHE[t] = torch.tensor([t], dtype=torch.int64)
    return tt


def _timesteps(t, t_prev, x, sched: NoiseSchedule, prediction: int):
    """(t, t_prev) for the op on any device. Tensors pass through (the op checks them where
    they are readable). On the CPU, ints become cached CPU tensors the op checks; on a
    GPU, ints are checked here and become cached device tensors (no copy per step), and
    an int beside a CPU tensor goes as a CPU tensor so that the op can compare the two."""
    if x.device.type == "cpu":
        return _t_cpu(t), (None if t_prev is None else _t_cpu(t_prev, "t_prev"))
    T = sched.num_timesteps
    ti, tpi = V._as_int(t), (None if t_prev is None else V._as_int(t_prev))
    if ti is not None and (t_prev is None or tpi is not None):
        ti = V.int_timestep(ti, T)
        V.check_zero_snr(sched, ti, prediction)
        if tpi is None:
            return V._int_timestep_tensor(ti, x.device), None
        tpi = V.int_timestep(tpi, T, "t_prev", allow_negative=True)
        if tpi >= ti:
            raise ValueError(V._T_PREV_ORDER)
        return V._int_timestep_tensor(ti, x.device), V._int_timestep_tensor(tpi, x.device)
    tt = _t_cpu(t) if ti is None else _t_cpu(ti)
    if prediction >= 0:
        V.check_zero_snr(sched, tt, prediction)  # the op cannot read a GPU table
    return tt, (None if t_prev is None else _t_cpu(t_prev, "t_prev"))


def _float(v, name: str) -> float:
    """A Python number or a one-element CPU tensor as a float (the op checks its range).
    A tensor on a device is refused: reading it would wait for the device."""
    if type(v) is float:
        return v
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got bool")
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, _Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        if v.device.type != "cpu":
            raise TypeError(f"{name} must be a Python number or a CPU tensor, got a tensor on {v.device}; "
                            f"reading it would synchronize with the device")
        return float(v.item())
    raise TypeError(f"{name} must be a real number, got {type(v).__name__}")


def _prediction(p) -> int:
    code = _PRED.get(p) if type(p) is str else None
    return code if code is not None else V.check_prediction_type(p)


def _variance(v) -> int:
    code = _VAR.get(v) if type(v) is str else None
    return code if code is not None else V.check_variance(v)


def _clip(c) -> float:
    if c is None:
        return 0.0
    c = V.check_clip(c)
    return 0.0 if c is None else c


def _key(generator, x, draws: bool):
    """(generator, seed, offset) for a torch.ops call (the traceable path). CUDA generators
    go to the op (it reads torch's Philox state, graph-safe); CPU ones are keyed here."""
    if not draws:
        return None, 0, 0
    if generator is not None and not isinstance(generator, torch.Generator):
        V.check_generator(generator, x, None)
    if x.device.type == "cuda" and (generator is None or generator.device.type == "cuda"):
        return (generator if generator is not None else _rng.default_cuda_generator(x.device)), 0, 0
    seed, offset = _rng.cpu_generator_key(generator)
    return None, _rng._to_int64(seed), _rng._to_int64(offset)


def _keys(x, name: str, seeds, step, generator, noise) -> tuple:
    """seeds=/step=, checked, as the raw ops' trailing (seeds, step_t, step); () without them."""
    if seeds is None and step is None:
        return ()
    return _rng.keyed(_tensor_x(x, name), seeds, step, generator, noise).op_args()


def _tensor_x(x, name: str = "x"):
    if not isinstance(x, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


# ---- q_sample ----------------------------------------------------------------------
def q_sample(x0, t, noise=None, *, schedule=None, generator=None, seeds=None, step=None):
    """Noise clean samples to timestep ``t`` (diffusers' ``add_noise``).

    ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` with ``ab = schedule.alphas_cumprod``.

    Args:
        x0: (B, ...) float16/bfloat16/float32/float64 tensor, any strides.
        t: int, or an integer tensor on the CPU or x0's device: shape () (shared), (B,)
            (per sample, aligned with x0's FIRST dim, unlike torch's broadcasting), or
            2 <= ndim <= x0.ndim broadcasting to x0's shape torch-style (per frame
            ``(B, 1, F, 1, 1)``, per token ``(B, N, 1)``): each element noised to its t.
        noise: optional tensor broadcastable to x0; drawn in-kernel (Philox) when None.
        schedule: :class:`NoiseSchedule` (default: linear 1e-4..0.02, T = 1000).
        generator: torch.Generator for the drawn noise (CPU or CUDA).
        seeds, step: per-sample keys instead: the noise of sample b is a pure function of
            (seeds[b], step) (README "Reproducible noise"); seeds an int or (B,) int64.

    Returns:
        ``(x_t, noise)``: x_t of the promoted dtype of x0 and noise, channels_last if x0 is;
        ``noise`` is the tensor used (drawn: of x_t's dtype).
    """
    keys = _keys(x0, "x0", seeds, step, generator, noise)
    if _fast(x0, x0):
        return _F._q_sample(x0, _t_cpu(t), _cpu_table(schedule), noise, generator, *keys)
    x0 = _tensor_x(x0, "x0")
    if not _use_native(x0):
        return fallback.q_sample(x0, t, noise, schedule=schedule, generator=generator, seeds=seeds, step=step)
    sched = V.check_schedule(schedule)
    tt, _ = _timesteps(t, None, x0, sched, -1)
    if noise is not None and generator is not None:
        V.check_generator(generator, x0, noise)
    if _eager(x0, x0):
        return _F._q_sample(x0, tt, sched.table(x0.device), noise, generator, *keys)
    gen, seed, offset = _key(generator, x0, noise is None and not keys)
    xt, drawn = _ops.q_sample(x0, tt, sched.table(x0.device), noise, gen, seed, offset, *keys)
    return xt, (noise if noise is not None else drawn)


# ---- ddim_step ---------------------------------------------------------------------
def ddim_step(x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon", clip_sample=None,
              noise=None, generator=None, seeds=None, step=None):
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev``.

    ``x' = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps + std z``, ``std = eta sqrt(var)``,
    ``var = (1-ab')/(1-ab) (1 - ab/ab')``; x0 and eps come from the model output ``eps``
    per ``prediction_type`` (``"epsilon"``, ``"sample"``, ``"v_prediction"``), x0 clamped
    to ``[-clip_sample, clip_sample]`` when given. ``eta=0`` is deterministic (no noise
    drawn); ``eta=1`` with ``t_prev=t-1`` is DDPM with the posterior variance.

    Args:
        x: (B, ...) current sample. eps: model output on x's device, broadcastable to x;
            its dtype may differ (the result promotes, as torch does).
        t, t_prev: int or integer tensors in the layouts of :func:`q_sample` (shared,
            per sample (B,), or broadcasting to x: per frame, per token), each on its
            own; ``t_prev`` defaults to ``t - 1``, must be below ``t`` elementwise, and
            ``t_prev < 0`` is the final step (``ab' = 1``).
        eta: a Python number or a CPU scalar tensor (a device tensor would need a sync).
        noise / generator: the z to use, or the generator to draw it from (in-kernel).
        seeds, step: per-sample keys instead of a generator (:func:`q_sample`).

    Returns: ``x_{t_prev}``, x's shape, the promoted dtype; channels_last if x is, else
    contiguous.
    """
    keys = _keys(x, "x", seeds, step, generator, noise)
    if _fast(x, eps):
        return _F._ddim_step(x, eps, _t_cpu(t), None if t_prev is None else _t_cpu(t_prev, "t_prev"),
                             _cpu_table(schedule), eta if type(eta) is float else _float(eta, "eta"),
                             _prediction(prediction_type), _clip(clip_sample), noise, generator, *keys)
    x = _tensor_x(x)
    if not _use_native(x):
        return fallback.ddim_step(x, eps, t, eta, t_prev=t_prev, schedule=schedule, prediction_type=prediction_type,
                                  clip_sample=clip_sample, noise=noise, generator=generator, seeds=seeds, step=step)
    _tensor_x(eps, "eps")
    sched = V.check_schedule(schedule)
    pred = _prediction(prediction_type)
    tt, tp = _timesteps(t, t_prev, x, sched, pred)
    eta = _float(eta, "eta")
    if noise is not None and generator is not None:
        V.check_generator(generator, x, noise)
    if _eager(x, eps):
        return _F._ddim_step(x, eps, tt, tp, sched.table(x.device), eta, pred, _clip(clip_sample), noise, generator,
                             *keys)
    gen, seed, offset = _key(generator, x, eta > 0 and noise is None and not keys)
    return _ops.ddim_step(x, eps, tt, tp, sched.table(x.device), eta, pred, _clip(clip_sample), noise, gen, seed,
                          offset, *keys)


# ---- ddpm_step ---------------------------------------------------------------------
def ddpm_step(x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
              clip_sample=None, noise=None, generator=None, seeds=None, step=None):
    """One ancestral DDPM step (Ho et al. 2020, Algorithm 2) from ``t`` to ``t_prev``.

    With ``a = ab/ab'``, ``b = 1 - a``: ``mean = sqrt(ab') b/(1-ab) x0 + sqrt(a)(1-ab')/(1-ab) x``
    (for epsilon prediction and ``t_prev = t-1``: ``(x - b/sqrt(1-ab) eps)/sqrt(a)``), plus
    ``std z`` with ``std^2 = max((1-ab')/(1-ab) b, 1e-20)`` (``"fixed_small"``) or ``b``
    (``"fixed_large"``); no noise where ``t == 0``. Arguments as in :func:`ddim_step`.
    """
    keys = _keys(x, "x", seeds, step, generator, noise)
    if _fast(x, eps):
        return _F._ddpm_step(x, eps, _t_cpu(t), None if t_prev is None else _t_cpu(t_prev, "t_prev"),
                             _cpu_table(schedule), _variance(variance), _prediction(prediction_type),
                             _clip(clip_sample), noise, generator, *keys)
    x = _tensor_x(x)
    if not _use_native(x):
        return fallback.ddpm_step(x, eps, t, t_prev=t_prev, schedule=schedule, variance=variance,
                                  prediction_type=prediction_type, clip_sample=clip_sample, noise=noise,
                                  generator=generator, seeds=seeds, step=step)
    _tensor_x(eps, "eps")
    sched = V.check_schedule(schedule)
    pred = _prediction(prediction_type)
    tt, tp = _timesteps(t, t_prev, x, sched, pred)
    var = _variance(variance)
    if noise is not None and generator is not None:
        V.check_generator(generator, x, noise)
    if _eager(x, eps):
        return _F._ddpm_step(x, eps, tt, tp, sched.table(x.device), var, pred, _clip(clip_sample), noise, generator,
                             *keys)
    gen, seed, offset = _key(generator, x, noise is None and not keys)
    return _ops.ddpm_step(x, eps, tt, tp, sched.table(x.device), var, pred, _clip(clip_sample), noise, gen, seed,
                          offset, *keys)


# ---- langevin_step -----------------------------------------------------------------
def langevin_step(x, score, step_size, *, noise=None, generator=None, seeds=None, step=None):
    """One Langevin step ``x + step_size * score + sqrt(2 step_size) z``.

    This is the NCSN *code* convention; the NCSN paper writes ``x + (e/2) s + sqrt(e) z``,
    i.e. its ``e`` is ``2 * step_size`` here. Dtypes promote, layouts as in :func:`ddim_step`.
    ``seeds``/``step``: per-sample keys (:func:`q_sample`)."""
    keys = _keys(x, "x", seeds, step, generator, noise)
    if _fast(x, score):
        return _F._langevin_step(x, score, step_size if type(step_size) is float else _float(step_size, "step_size"),
                                 noise, generator, *keys)
    x = _tensor_x(x)
    if not _use_native(x):
        return fallback.langevin_step(x, score, step_size, noise=noise, generator=generator, seeds=seeds, step=step)
    _tensor_x(score, "score")
    alpha = _float(step_size, "step_size")
    if noise is not None and generator is not None:
        V.check_generator(generator, x, noise)
    if _eager(x, score):
        return _F._langevin_step(x, score, alpha, noise, generator, *keys)
    gen, seed, offset = _key(generator, x, noise is None and not keys)
    return _ops.langevin_step(x, score, alpha, noise, gen, seed, offset, *keys)


def annealed_langevin(score_fn, x, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False, generator=None,
                      callback=None, seeds=None):
    """NCSN annealed Langevin dynamics; ``score_fn(x, sigma)`` is the (learned) score.

    Level ``i`` uses ``alpha_i = step_lr (sigma_i / sigma_L)^2`` for ``n_steps_each`` (>= 1)
    steps of :func:`langevin_step` (fused, in-kernel noise); ``denoise=True`` adds NCSNv2's final
    ``x + sigma_L^2 s(x, sigma_L)``. ``callback(level, step, sigma, x)`` runs after each step.
    Stable for ``step_lr < 2 sigma_L^2``. ``seeds=``: per-sample keys, chain step ``k``
    (counting over all levels from 0) drawing with ``step=k``."""
    V.check_x(x)
    s = V.check_sigmas(sigmas, x)
    n = V.check_steps(n_steps_each, "n_steps_each")
    lr = V.check_positive(step_lr, "step_lr")
    V.check_generator(generator, x, None)
    _rng.keyed(x, seeds, None, generator)  # checks seeds
    if seeds is not None:
        def one(x_, s_, a_, k_):
            return langevin_step(x_, s_, a_, seeds=seeds, step=k_)
    else:
        def one(x_, s_, a_, k_):
            return langevin_step(x_, s_, a_, generator=generator)
    return R.annealed_langevin(score_fn, x, s, n_steps_each=n, step_lr=lr, denoise=denoise,
                               generator=generator, callback=callback, _step=one)


# ---- Gaussian mixtures -------------------------------------------------------------
def gmm_score(x, weights, means, stds, sigma):
    """Exact score of a diagonal Gaussian mixture convolved with ``N(0, sigma^2 I)``;
    see :func:`diffkern.reference.gmm_score`."""
    V.check_x(x)
    mix = V.check_mixture(x, weights, means, stds)
    return R._gmm_score(x, mix, V.check_sigma(sigma))


def gmm_annealed_langevin(x, weights, means, stds, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False,
                          generator=None):
    """Annealed Langevin on the exact mixture score with the whole chain fused: every
    point's levels and steps run in registers in one pass (native), drawing the same
    noise as :func:`diffkern.reference.gmm_annealed_langevin` for the same generator.

    ``x``: (..., D) float32/float64 start points; ``weights`` (K,), ``means`` (K, D),
    ``stds`` (K, D) or (K,); ``sigmas`` descending; ``n_steps_each`` >= 1. Native for
    D <= 16 (and K <= 64 on CUDA); the op checks the mixture (values where on the CPU)."""
    x = _tensor_x(x)
    native = (native_available(x.device) and x.dtype in (torch.float32, torch.float64) and x.dim() >= 1
              and 1 <= x.shape[-1] <= 16 and isinstance(weights, _Tensor)
              and (x.device.type == "cpu" or weights.numel() <= 64))
    if not native:
        return fallback.gmm_annealed_langevin(x, weights, means, stds, sigmas, n_steps_each=n_steps_each,
                                              step_lr=step_lr, denoise=denoise, generator=generator)
    s = V.check_sigmas(sigmas, x)  # a list -> a CPU float64 tensor
    n = V.check_steps(n_steps_each, "n_steps_each")
    if not _is_compiling() and (generator is None or isinstance(generator, torch.Generator)):
        gen = generator if generator is not None else torch.default_generator if x.is_cpu else None
        if gen is not None or x.is_cpu:
            return _ops.gmm_annealed_langevin(x, weights, means, stds, s, n, _float(step_lr, "step_lr"),
                                              bool(denoise), gen, 0, 0)
    gen, seed, offset = _key(generator, x, True)
    return _ops.gmm_annealed_langevin(x, weights, means, stds, s, n, _float(step_lr, "step_lr"), bool(denoise),
                                      gen, seed, offset)


# ---- the reference path ------------------------------------------------------------
class fallback:  # noqa: N801  (a namespace: diffkern.ops.fallback.ddim_step(...))
    """The public ops on the pure-PyTorch reference, with the checks of _validate.py: what
    runs without the extension (or with DIFFKERN_DISABLE_NATIVE=1, or on a device without
    kernels). Same signatures, same errors as the native path."""

    @staticmethod
    def q_sample(x0, t, noise=None, *, schedule=None, generator=None, seeds=None, step=None):
        x0 = V.check_x(x0, "x0")
        gen = _rng.keyed(x0, seeds, step, generator, noise)
        sched = V.check_schedule(schedule)
        tt = V.check_timesteps(t, x0, sched.num_timesteps)
        if noise is not None:
            V.check_like(x0, noise, "noise")
        V.check_generator(generator, x0, noise)
        return R._q_sample(x0, tt, sched.table(x0.device), noise, gen)

    @staticmethod
    def ddim_step(x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon", clip_sample=None,
                  noise=None, generator=None, seeds=None, step=None):
        gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
        a = V.step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
        eta = V.check_nonneg(eta, "eta")
        return R._ddim(x, eps, a, eta, noise, gen)

    @staticmethod
    def ddpm_step(x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
                  clip_sample=None, noise=None, generator=None, seeds=None, step=None):
        gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
        a = V.step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
        var = V.check_variance(variance)
        return R._ddpm(x, eps, a, var, noise, gen)

    @staticmethod
    def langevin_step(x, score, step_size, *, noise=None, generator=None, seeds=None, step=None):
        V.check_x(x)
        gen = _rng.keyed(x, seeds, step, generator, noise)
        V.check_like(x, score, "score")
        step = V.check_nonneg(step_size, "step_size")
        if noise is not None:
            V.check_like(x, noise, "noise")
        V.check_generator(generator, x, noise)
        return R._langevin(x, score, step, noise, gen)

    @staticmethod
    def gmm_annealed_langevin(x, weights, means, stds, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False,
                              generator=None):
        V.check_x(x)
        mix = V.check_mixture(x, weights, means, stds)
        s = V.check_sigmas(sigmas, x)
        n = V.check_steps(n_steps_each, "n_steps_each")
        lr = V.check_positive(step_lr, "step_lr")
        V.check_generator(generator, x, None)
        seed, offset = _rng.generator_key(generator, x.device)
        return R._gmm_loop(x, mix, s, n, lr, denoise, seed, offset)

    annealed_langevin = staticmethod(annealed_langevin)  # validates, then the reference loop
    gmm_score = staticmethod(gmm_score)


# ---- fake kernels -------------------------------------------------------------------
if _NATIVE:
    def _out(x, dtype, fmt=None):
        """An output of x's shape in ``dtype``, laid out as the kernels lay it out."""
        return torch.empty(x.shape, dtype=dtype, device=x.device,
                           memory_format=V.output_format(x) if fmt is None else fmt)

    def _check_meta(x, m, noise, t=None, t_prev=None, x_name="x", m_name="model_output (eps)"):
        """The metadata half of the C++ checks (shapes, dtypes, devices), for fake tensors:
        a compiled call fails at trace time, and a call mixing a meta tensor with real ones
        (which the dispatcher sends here) fails as it would natively."""
        V.check_x(x, x_name)
        if m is not None:
            V.check_like(x, m, m_name)
        if noise is not None:
            V.check_like(x, noise, "noise")
        for v, name in ((t, "t"), (t_prev, "t_prev")):
            if v is None:
                continue
            if v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
                raise TypeError(f"{name} must be an integer tensor, got {v.dtype}")
            V.level_shape(v, x, name)
            if v.device.type != "cpu" and v.device != x.device:
                raise ValueError(f"{name} is on {v.device} but x is on {x.device}")

    @torch.library.register_fake("diffkern::q_sample")
    def _(x0, t, table, noise, generator, seed, offset, seeds=None, step_t=None, step=0):
        _check_meta(x0, None, noise, t, x_name="x0")
        dt = V.result_dtype(x0, noise)
        return _out(x0, dt), (torch.empty(0, dtype=dt, device=x0.device) if noise is not None else _out(x0, dt))

    @torch.library.register_fake("diffkern::ddim_step")
    def _(x, m, t, t_prev, table, eta, prediction_type, clip, noise, generator, seed, offset, seeds=None, step_t=None,
          step=0):
        _check_meta(x, m, noise, t, t_prev)
        return _out(x, V.result_dtype(x, m, noise if eta > 0 else None))

    @torch.library.register_fake("diffkern::ddpm_step")
    def _(x, m, t, t_prev, table, variance, prediction_type, clip, noise, generator, seed, offset, seeds=None,
          step_t=None, step=0):
        _check_meta(x, m, noise, t, t_prev)
        return _out(x, V.result_dtype(x, m, noise))

    @torch.library.register_fake("diffkern::langevin_step")
    def _(x, score, step_size, noise, generator, seed, offset, seeds=None, step_t=None, step=0):
        _check_meta(x, score, noise, m_name="score")
        return _out(x, V.result_dtype(x, score, noise))

    @torch.library.register_fake("diffkern::step_backward")
    def _(grad, x, m, t, t_prev, table, kind, eta, variance, prediction_type, clip, noise_grad):
        _check_meta(x, m, grad, t, t_prev)
        dt = V.result_dtype(x, m)
        c = torch.contiguous_format
        gz = _out(x, dt, c) if noise_grad else torch.empty(0, dtype=dt, device=x.device)
        return _out(x, dt, c), _out(x, dt, c), gz

    @torch.library.register_fake("diffkern::gmm_annealed_langevin")
    def _(x, weights, means, stds, sigmas, n_steps_each, step_lr, denoise, generator, seed, offset):
        return _out(x, x.dtype, torch.contiguous_format)

    # Every op's autograd is C++ (csrc/torch/autograd.cpp): a Python one would cost more
    # than a small step.
