"""The ops below their checks: one function per op, for callers that validate once and
step many times (the diffusers drop-ins check their arguments in ``set_timesteps`` and
``step``'s first lines). The public ops (diffkern.ops, diffkern.sampler_ops) are their
checks followed by these same functions, so both reach the same kernels.

Arguments are the validated normal forms of the public ops (diffkern/_validate.py):
levels a Python float or a float32/float64 tensor on x's device in one of the level
layouts (README "Noise levels per sample, per frame, per token"); timesteps int64 tensors
on x's device; ``prediction`` the int code of ``_validate.PREDICTION_TYPES``; every tensor
on x's device; ``generator`` a torch.Generator, per-sample keys (``_rng.keyed``) or None.
Each runs the native kernel when it is built for x's device, else the reference (same
numbers, same drawn noise). Nothing here checks: a wrong argument gives a wrong result or
an error from the kernel's own checks, not the public message.
"""

from __future__ import annotations

import torch

from . import _native
from . import _native_samplers as N
from . import reference as R
from . import reference_samplers as RS
from ._rng import Keyed
from ._validate import _compiling

__all__ = ["q_sample", "ddim_step", "ddpm_step", "euler_step", "heun_step", "dpmpp_2m_step", "flow_step",
           "flow_q_sample", "lcm_step", "linear_step", "LinearCoeffs"]

_tf_mode = torch._C._is_torch_function_mode_enabled


def _native_for(x: torch.Tensor) -> bool:
    """native_available(x.device) without building a device object (host time per step)."""
    return _native._loaded and (x.is_cpu or (x.is_cuda and _native._cuda))


def _eager_entry(x: torch.Tensor, m: torch.Tensor):
    """The extension's eager entry points (no torch.ops Python layer; CPU generators keyed
    in C++ as diffkern._rng keys them) when they apply: CPU plain tensors, nothing traced."""
    F = _native._fast
    if F is None or type(x) is not torch.Tensor or type(m) is not torch.Tensor or not x.is_cpu or _tf_mode() \
            or _compiling():
        return None
    return F


def _generator(generator):
    """(generator, keys) for the eager entries: per-sample keys go as trailing arguments."""
    if isinstance(generator, Keyed):
        return None, generator.op_args()
    return generator, ()


# ---- the DDPM family (t, t_prev: (1,)/(B,)/level-shaped int64 on x's device) -------------
def _step_args(t, tp, table, prediction, clip):
    a = R.StepArgs()
    a.t, a.t_prev_arg, a.table, a.prediction, a.clip = t, tp, table, prediction, clip
    return a


def ddim_step(x, m, t, t_prev, table, eta, prediction, clip, noise=None, generator=None):
    """:func:`diffkern.ddim_step` on validated arguments (``clip`` None or a float > 0)."""
    if _native_for(x):
        gen, keys = _generator(generator if eta > 0 else None)
        F = _eager_entry(x, m)
        if F is not None:
            return F._ddim_step(x, m, t, t_prev, table, eta, prediction, clip or 0.0, noise if eta > 0 else None,
                                gen, *keys)
        key = N._noise_key(x, generator, eta > 0 and noise is None)
        return torch.ops.diffkern.ddim_step(x, m, t, t_prev, table, eta, prediction, clip or 0.0,
                                            noise if eta > 0 else None, *key)
    return R._ddim(x, m, _step_args(t, t_prev, table, prediction, clip), eta, noise, generator)


def ddpm_step(x, m, t, t_prev, table, variance, prediction, clip, noise=None, generator=None):
    """:func:`diffkern.ddpm_step` on validated arguments (``variance`` the int code)."""
    if _native_for(x):
        gen, keys = _generator(generator)
        F = _eager_entry(x, m)
        if F is not None:
            return F._ddpm_step(x, m, t, t_prev, table, variance, prediction, clip or 0.0, noise, gen, *keys)
        key = N._noise_key(x, generator, noise is None)
        return torch.ops.diffkern.ddpm_step(x, m, t, t_prev, table, variance, prediction, clip or 0.0, noise, *key)
    return R._ddpm(x, m, _step_args(t, t_prev, table, prediction, clip), variance, noise, generator)


def q_sample(x0, t, table, noise=None, generator=None):
    """:func:`diffkern.q_sample` on validated arguments: ``(x_t, noise used)``."""
    if _native_for(x0):
        gen, keys = _generator(generator)
        F = _eager_entry(x0, x0)
        if F is not None:
            return F._q_sample(x0, t, table, noise, gen, *keys)
        key = N._noise_key(x0, generator, noise is None)
        xt, drawn = torch.ops.diffkern.q_sample(x0, t, table, noise, *key)
        return xt, (noise if noise is not None else drawn)
    return R._q_sample(x0, t, table, noise, generator)


# ---- the sampler families ----------------------------------------------------------------
def _run(native, reference, *args):
    if _native_for(args[0] if isinstance(args[0], torch.Tensor) else args[0][0]) and N._ops is not None:
        out = native(*args)
        if out is not NotImplemented:
            return out
    return reference(*args)


def euler_step(x, m, sigma, sigma_next, eta, s_noise, gamma, prediction, noise=None, generator=None):
    """:func:`diffkern.euler_step` on validated arguments."""
    return _run(N.euler_step, RS._euler, x, m, sigma, sigma_next, eta, s_noise, gamma, prediction, noise, generator)


def heun_step(x, m, x_proposal, m_proposal, sigma, sigma_next, prediction):
    """:func:`diffkern.heun_step` on validated arguments."""
    return _run(N.heun_step, RS._heun, x, m, x_proposal, m_proposal, sigma, sigma_next, prediction)


def dpmpp_2m_step(x, m, old_denoised, sigma, sigma_next, sigma_prev, prediction, solver_type, variance_preserving,
                  return_denoised):
    """:func:`diffkern.dpmpp_2m_step` on validated arguments (``solver_type`` the string)."""
    return _run(N.dpmpp_2m_step, RS._dpmpp_2m, x, m, old_denoised, sigma, sigma_next, sigma_prev, prediction,
                solver_type, variance_preserving, return_denoised)


def flow_step(x, v, sigma, sigma_next, stochastic, noise=None, generator=None):
    """:func:`diffkern.flow_step` on validated arguments. A deterministic step on plain
    tensors of one dtype with number levels calls the raw overload directly: at 1x4x64x64
    the general path's argument handling cost as much as the step."""
    if (not stochastic and type(sigma) is float and type(sigma_next) is float and _FLOW is not None
            and x.dtype == v.dtype and _native_for(x) and not _compiling()):
        return _FLOW(x, v, None, None, sigma, sigma_next, False, None, None, 0, 0)
    return _run(N.flow_step, RS._flow, x, v, sigma, sigma_next, stochastic, noise, generator)


def flow_q_sample(x0, sigma, noise=None, generator=None):
    """:func:`diffkern.flow_q_sample` on validated arguments: ``(x_sigma, noise used)``."""
    return _run(N.flow_q_sample, RS._flow_q_sample, x0, sigma, noise, generator)


def lcm_step(x, m, t, t_prev, table, prediction, timestep_scaling, sigma_data, clip, return_denoised, noise=None,
             generator=None, final=None):
    """:func:`diffkern.lcm_step` on validated arguments (t, t_prev int64 on x's device).
    ``final``: whether every sample is at its last step, when the caller knows it on the
    host; then nothing is drawn on that step (diffusers' LCMScheduler draws no noise there),
    where the op alone would read a CPU t_prev to find out and draw on a device one."""
    if final is not None and _native_for(x) and x.dtype == m.dtype and (noise is None or noise.dtype == x.dtype):
        gen, seed, off, *keys = N._noise_key(x, generator, noise is None and not final)
        out, den = torch.ops.diffkern.lcm_step(x, m, t, t_prev, table, float(timestep_scaling), float(sigma_data),
                                               prediction, clip or 0.0, not final, noise, gen, seed, off, True, *keys)
        return (out, den) if return_denoised else out
    a = RS._LcmArgs()
    a.t, a.t_prev, a.table, a.prediction = t, t_prev, table, prediction
    a.timestep_scaling, a.sigma_data, a.clip, a.return_denoised = (float(timestep_scaling), float(sigma_data), clip,
                                                                    return_denoised)
    return _run(N.lcm_step, RS._lcm, x, m, a, noise, generator)


class LinearCoeffs:
    """linear_step's host coefficients converted once (K rows of J floats, K noise
    coefficients or None): a caller whose rows depend only on the step index makes them
    once per index (per ``set_timesteps``) instead of once per call."""

    __slots__ = ("rows", "noise", "flat", "K")

    def __init__(self, rows, noise_coeffs=None):
        self.rows = tuple(tuple(float(v) for v in row) for row in rows)
        self.noise = None if noise_coeffs is None else tuple(float(v) for v in noise_coeffs)
        self.K = len(self.rows)
        ncs = self.noise if self.noise is not None else (0.0,) * self.K
        self.flat = [v for k in range(self.K) for v in (*self.rows[k], ncs[k])]


def linear_step(inputs, coeffs, noise_coeffs=None, noise=None, generator=None):
    """:func:`diffkern.linear_step` on validated arguments: ``inputs`` a list (x first),
    ``coeffs`` K host rows, a :class:`LinearCoeffs` (then ``noise_coeffs`` is its own), or
    a (1|B, K, J) float64 tensor on x's device; ``noise_coeffs`` None / K floats / a
    (1|B, K) tensor. Returns the tuple of K outputs."""
    x = inputs[0]
    if isinstance(coeffs, LinearCoeffs):
        pre = coeffs
        if (_LINEAR is not None and generator is None and (pre.noise is None) == (noise is None) and _native_for(x)
                and not _compiling() and all(t.dtype == x.dtype for t in inputs)
                and (noise is None or noise.dtype == x.dtype)):
            # operands of one dtype, noise given or none, nothing traced: the raw overload
            return _LINEAR(list(inputs), pre.flat, None, pre.K, pre.noise is not None, noise, None, 0, 0)
        coeffs, noise_coeffs = pre.rows, pre.noise
    K = coeffs.shape[-2] if isinstance(coeffs, torch.Tensor) else len(coeffs)
    if not isinstance(coeffs, torch.Tensor):
        coeffs = tuple(tuple(float(v) for v in row) for row in coeffs)
    if noise_coeffs is not None and not isinstance(noise_coeffs, torch.Tensor):
        noise_coeffs = tuple(float(v) for v in noise_coeffs)
    return _run(N.linear_step, RS._linear, list(inputs), coeffs, noise_coeffs, K, noise, generator)


def _raw(name):
    """The default overload of raw op ``name`` when the CPU kernels are built, else None."""
    if N._ops is None or not _native.native_available(torch.device("cpu")):
        return None
    try:
        return getattr(N._ops, name).default
    except (AttributeError, RuntimeError):  # an extension built before the op existed
        return None


_LINEAR = _raw("linear_step")
_FLOW = _raw("flow_step")
