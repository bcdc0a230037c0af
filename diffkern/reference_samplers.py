"""Sampler families (k-diffusion / diffusers): the reference steps, in pure PyTorch.

The state is k-diffusion's: ``x = x0 + sigma * eps`` with the VE noise level
``sigma = sqrt((1 - ab)/ab)`` (Karras et al. 2022), except where an op says otherwise
(``dpmpp_2m_step(variance_preserving=True)``, the flow ops, ``lcm_step``). The formulas are
k-diffusion's ``sampling.py`` and diffusers' schedulers (SAMPLER_SEMANTICS.md):

- model output -> denoised sample ("prediction_type"), with the VE sigma:
  ``"sample"`` ``D = m``; ``"epsilon"`` ``D = x - sigma m``;
  ``"v_prediction"`` ``D = m (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1)``.
- Euler (Karras et al. 2022, Alg. 2 without the second order): ``d = (x - D)/sigma``,
  ``x' = x + d (sigma_next - sigma)``; ancestral: k-diffusion's ``get_ancestral_step``.
- Heun (Karras et al. 2022, Alg. 1): ``x' = x + (d + d')/2 (sigma_next - sigma)``.
- DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), with ``t = -log sigma``, ``h = t' - t``.
- Flow matching Euler (Esser et al. 2024, diffusers' FlowMatchEulerDiscreteScheduler).
- LCM (Luo et al. 2023, diffusers' LCMScheduler).

Noise levels arrive validated (a Python float, a 1-D tensor of length 1 or B on x's
device, per sample along x's first dim, or a tensor broadcasting to x's shape
torch-style: per frame, per token; see :mod:`diffkern.sampler_ops`); coefficients are
formed in float64 and cast to the compute dtype (float64 for float64 operands, else
float32). Output dtype is the promotion of x's, the model
outputs' and, where the step uses it, the given noise's dtypes (torch's rule, as
q_sample/ddim_step); outputs have x's shape and layout (channels_last kept) and never
alias an input. Noise, when drawn, comes from :mod:`diffkern._rng` (the native ops'
Philox stream), one x-shaped draw per call.
"""

from __future__ import annotations

import math

import torch

from . import _rng
from . import _validate as V
from ._reference_common import _draw, _lookup, _per_sample

__all__ = ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step", "linear_step"]

SOLVER_TYPES = ("midpoint", "heun")


def _dtypes(*tensors: torch.Tensor):
    """(compute dtype, output dtype) for operands that may differ in dtype (None: an
    operand the step does not use, such as noise=None or noise a deterministic step
    ignores; given noise that the step uses promotes as in ``x + sigma_up * z``)."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return (torch.float64 if out == torch.float64 else torch.float32), out


def _out(result: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, operand: torch.Tensor | None = None):
    """A result as the native ops hand it back: the promoted dtype, x's shape (``sample``
    prediction makes D = m, which may be a broadcast operand), x's layout (channels_last
    stays channels_last whatever the operands' layouts; torch's elementwise ops would
    follow theirs), and never a view of the caller's ``operand``: editing the result in
    place must not edit the input."""
    result = result.to(dtype)
    if result.shape != x.shape:
        result = result.expand(x.shape)
    fmt = V.output_format(x)
    if not result.is_contiguous(memory_format=fmt):
        result = result.contiguous(memory_format=fmt)
    if operand is not None and result.untyped_storage().data_ptr() == operand.untyped_storage().data_ptr():
        result = result.clone(memory_format=fmt)
    return result


def _level(v, x: torch.Tensor) -> torch.Tensor:
    """A validated per-sample scalar as a float64 tensor broadcastable against x."""
    if isinstance(v, torch.Tensor):
        return _per_sample(v.to(torch.float64), x)
    return torch.tensor(v, dtype=torch.float64, device=x.device)


def _noise(x: torch.Tensor, noise, generator, cd) -> torch.Tensor:
    return _draw(x, generator).to(cd) if noise is None else noise.to(cd)


def denoised_from(x: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor, prediction: int, cd) -> torch.Tensor:
    """The denoised sample D(x; sigma) from the model output m (VE state, float64 sigma)."""
    if prediction == V.PREDICTION_TYPES["sample"]:
        return m
    if prediction == V.PREDICTION_TYPES["epsilon"]:
        return x - sigma.to(cd) * m
    # v = alpha eps - sigma_vp x0 (Salimans & Ho 2022) in the VE variables
    return m * (-sigma / (sigma * sigma + 1).sqrt()).to(cd) + x / (sigma * sigma + 1).to(cd)


def ancestral_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float):
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up) with
    sigma_down^2 + sigma_up^2 = sigma_next^2."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


# ---- Euler / Euler ancestral / churn -------------------------------------------------
def _euler_args(x, denoised, sigma, sigma_next, eta, s_noise, gamma, prediction_type, noise, generator):
    V.check_x(x)
    V.check_operand(x, denoised, "denoised")
    s = V.check_noise_level(sigma, x, "sigma", positive=True)
    sn = V.check_noise_level(sigma_next, x, "sigma_next")
    eta = V.check_nonneg(eta, "eta")
    s_noise = V.check_nonneg(s_noise, "s_noise")
    gamma = V.check_nonneg(gamma, "gamma")
    if eta > 0 and gamma > 0:
        raise ValueError("eta (ancestral noise) and gamma (churn) are exclusive; pass one of them")
    if eta > 0:
        V.check_level_order(sigma_next, sigma, x, "sigma_next must be <= sigma for the ancestral step (eta > 0)")
    pred = V.check_prediction_type(prediction_type)
    if noise is not None:
        V.check_operand(x, noise, "noise")
    V.check_generator(generator, x, noise)
    return s, sn, eta, s_noise, gamma, pred


def euler_step(x, denoised, sigma, sigma_next, *, eta=0.0, s_noise=1.0, gamma=0.0, prediction_type="sample",
               noise=None, generator=None, seeds=None, step=None):
    """One Euler step of the probability-flow ODE ``dx/dsigma = (x - D)/sigma`` from
    ``sigma`` to ``sigma_next`` (k-diffusion's sample_euler); ``eta > 0``: Euler ancestral
    (sample_euler_ancestral); ``gamma > 0``: diffusers' EulerDiscrete churn."""
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = _euler_args(x, denoised, sigma, sigma_next, eta, s_noise, gamma, prediction_type, noise, generator)
    return _euler(x, denoised, *a, noise, gen)


def _euler(x, m, sigma, sigma_next, eta, s_noise, gamma, prediction, noise, generator):
    cd, out_dtype = _dtypes(x, m, noise if eta > 0 or gamma > 0 else None)
    s, sn = _level(sigma, x), _level(sigma_next, x)
    xc, mc = x.to(cd), m.to(cd)
    if gamma > 0:
        # diffusers adds the churn after the model ran on the un-churned x at sigma: x0 is
        # then formed from x_hat with sigma_hat for epsilon and (its quirk) sigma for v.
        s_hat = s * (1 + gamma)
        z = _noise(x, noise, generator, cd)
        # sqrt(s_hat^2 - s^2), written without the cancellation at small gamma
        x_hat = xc + (s_noise * s * math.sqrt(gamma * (gamma + 2))).to(cd) * z
        den = denoised_from(x_hat, mc, s if prediction == V.PREDICTION_TYPES["v_prediction"] else s_hat,
                            prediction, cd)
        d = (x_hat - den) / s_hat.to(cd)
        return _out(x_hat + d * (sn - s_hat).to(cd), x, out_dtype)
    den = denoised_from(xc, mc, s, prediction, cd)
    d = (xc - den) / s.to(cd)
    if eta == 0:
        return _out(xc + d * (sn - s).to(cd), x, out_dtype)
    sigma_down, sigma_up = ancestral_split(s, sn, eta)
    out = xc + d * (sigma_down - s).to(cd)
    z = _noise(x, noise, generator, cd)
    out = torch.where(sn > 0, out + (s_noise * sigma_up).to(cd) * z, out)  # k-diffusion adds no noise at sigma 0
    return _out(out, x, out_dtype)


# ---- Heun ----------------------------------------------------------------------------
def _heun_args(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, prediction_type):
    V.check_x(x)
    V.check_operand(x, denoised, "denoised")
    V.check_operand(x, x_proposal, "x_proposal")
    V.check_operand(x, denoised_proposal, "denoised_proposal")
    s = V.check_noise_level(sigma, x, "sigma", positive=True)
    sn = V.check_noise_level(sigma_next, x, "sigma_next", positive=True)
    return s, sn, V.check_prediction_type(prediction_type)


def heun_step(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, *, prediction_type="sample"):
    """Heun's second stage (k-diffusion's sample_heun): ``x' = x + (d + d')/2 (sigma_next -
    sigma)`` with ``d = (x - D)/sigma`` and ``d' = (x_proposal - D')/sigma_next``; the first
    stage (``x_proposal``) is :func:`euler_step`."""
    a = _heun_args(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, prediction_type)
    return _heun(x, denoised, x_proposal, denoised_proposal, *a)


def _heun(x, m, x_proposal, m_proposal, sigma, sigma_next, prediction):
    cd, out_dtype = _dtypes(x, m, x_proposal, m_proposal)
    s, sn = _level(sigma, x), _level(sigma_next, x)
    xc, xp = x.to(cd), x_proposal.to(cd)
    d = (xc - denoised_from(xc, m.to(cd), s, prediction, cd)) / s.to(cd)
    d2 = (xp - denoised_from(xp, m_proposal.to(cd), sn, prediction, cd)) / sn.to(cd)
    return _out(xc + (d + d2) / 2 * (sn - s).to(cd), x, out_dtype)


# ---- DPM-Solver++(2M) ----------------------------------------------------------------
def _dpmpp_2m_args(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, prediction_type, solver_type,
                   variance_preserving, return_denoised):
    V.check_x(x)
    V.check_operand(x, denoised, "denoised")
    s = V.check_noise_level(sigma, x, "sigma", positive=True)
    sn = V.check_noise_level(sigma_next, x, "sigma_next")
    sp = None
    if old_denoised is not None:
        V.check_operand(x, old_denoised, "old_denoised")
        if sigma_prev is None:
            raise ValueError("sigma_prev is required with old_denoised (the second-order step needs r = h_last/h)")
        sp = V.check_noise_level(sigma_prev, x, "sigma_prev", positive=True)
        V.check_level_order(sigma, sigma_prev, x, "sigma_prev must be > sigma (sigmas descend)", strict=True)
        V.check_level_order(sigma_next, sigma, x, "sigma_next must be < sigma for the second-order step", strict=True)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {list(SOLVER_TYPES)}, got {solver_type!r}")
    if not isinstance(variance_preserving, bool):
        raise TypeError(f"variance_preserving must be a bool, got {type(variance_preserving).__name__}")
    if not isinstance(return_denoised, bool):
        raise TypeError(f"return_denoised must be a bool, got {type(return_denoised).__name__}")
    return s, sn, sp, V.check_prediction_type(prediction_type), solver_type, variance_preserving, return_denoised


def dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev=None, *, prediction_type="sample",
                  solver_type="midpoint", variance_preserving=False, return_denoised=False):
    """One DPM-Solver++(2M) step (k-diffusion's sample_dpmpp_2m; ``solver_type="heun"`` and
    ``variance_preserving=True`` as diffusers' DPMSolverMultistepScheduler)."""
    a = _dpmpp_2m_args(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, prediction_type, solver_type,
                       variance_preserving, return_denoised)
    return _dpmpp_2m(x, denoised, old_denoised, *a)


def _dpmpp_2m(x, m, old_denoised, sigma, sigma_next, sigma_prev, prediction, solver_type, variance_preserving,
              return_denoised):
    cd, out_dtype = _dtypes(x, m, old_denoised)
    s, sn = _level(sigma, x), _level(sigma_next, x)
    xc, mc = x.to(cd), m.to(cd)
    if variance_preserving:
        alpha = 1 / (s * s + 1).sqrt()  # x_vp = alpha x_ve, sigma_vp = sigma alpha
        sigma_vp = s * alpha
        if prediction == V.PREDICTION_TYPES["epsilon"]:
            den = (xc - sigma_vp.to(cd) * mc) / alpha.to(cd)
        elif prediction == V.PREDICTION_TYPES["v_prediction"]:
            den = alpha.to(cd) * xc - sigma_vp.to(cd) * mc
        else:
            den = mc
        x_ve = xc / alpha.to(cd)
    else:
        den = denoised_from(xc, mc, s, prediction, cd)
        x_ve = xc
    final = sn == 0
    # sigma_next = 0 gives h = inf and x' = D exactly; a finite stand-in keeps the unused
    # branch (and its gradient) free of inf * 0.
    sn_safe = torch.where(final, s / 2, sn)
    t, t_next = -s.log(), -sn_safe.log()
    h = t_next - t
    ratio = sn_safe / s  # sigma_fn(t_next) / sigma_fn(t)
    if old_denoised is None:
        x_next = ratio.to(cd) * x_ve - (-h).expm1().to(cd) * den
    else:
        sp = _level(sigma_prev, x)
        r = (t - (-sp.log())) / h  # h_last / h
        old = old_denoised.to(cd)
        if solver_type == "midpoint":
            den_d = (1 + 1 / (2 * r)).to(cd) * den - (1 / (2 * r)).to(cd) * old
            x_next = ratio.to(cd) * x_ve - (-h).expm1().to(cd) * den_d
        else:
            x_next = (ratio.to(cd) * x_ve - (-h).expm1().to(cd) * den
                      + ((-h).expm1() / h + 1).to(cd) * ((den - old) / r.to(cd)))
    x_next = torch.where(final, den, x_next)
    if variance_preserving:
        x_next = x_next * (1 / (sn * sn + 1).sqrt()).to(cd)
    x_next = _out(x_next, x, out_dtype)
    return (x_next, _out(den, x, out_dtype, m)) if return_denoised else x_next


# ---- flow matching -------------------------------------------------------------------
def _flow_args(x, velocity, sigma, sigma_next, stochastic, noise, generator):
    V.check_x(x)
    V.check_operand(x, velocity, "velocity")
    s = V.check_noise_level(sigma, x, "sigma")
    sn = V.check_noise_level(sigma_next, x, "sigma_next")
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {type(stochastic).__name__}")
    if noise is not None:
        V.check_operand(x, noise, "noise")
    V.check_generator(generator, x, noise)
    return s, sn, stochastic


def flow_step(x, velocity, sigma, sigma_next, *, stochastic=False, noise=None, generator=None, seeds=None,
              step=None):
    """Flow-matching Euler on ``x_sigma = (1 - sigma) x0 + sigma z``, ``v = z - x0``:
    ``x + (sigma_next - sigma) v``; ``stochastic=True``: ``(1 - sigma_next) x0 +
    sigma_next z'`` with ``x0 = x - sigma v`` and fresh noise z' (diffusers'
    FlowMatchEulerDiscreteScheduler with stochastic_sampling)."""
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = _flow_args(x, velocity, sigma, sigma_next, stochastic, noise, generator)
    return _flow(x, velocity, *a, noise, gen)


def _flow(x, v, sigma, sigma_next, stochastic, noise, generator):
    cd, out_dtype = _dtypes(x, v, noise if stochastic else None)
    s, sn = _level(sigma, x), _level(sigma_next, x)
    xc, vc = x.to(cd), v.to(cd)
    if not stochastic:
        return _out(xc + (sn - s).to(cd) * vc, x, out_dtype)
    x0 = xc - s.to(cd) * vc
    z = _noise(x, noise, generator, cd)
    return _out((1 - sn).to(cd) * x0 + sn.to(cd) * z, x, out_dtype)


def _flow_q_sample_args(x0, sigma, noise, generator):
    V.check_x(x0, "x0")
    s = V.check_noise_level(sigma, x0, "sigma", at_most_one=True)
    if noise is not None:
        V.check_operand(x0, noise, "noise")
    V.check_generator(generator, x0, noise)
    return s


def flow_q_sample(x0, sigma, noise=None, *, generator=None, seeds=None, step=None):
    """Rectified-flow noising ``x_sigma = (1 - sigma) x0 + sigma noise`` (training target
    ``noise - x0``); returns ``(x_sigma, noise)``."""
    gen = _rng.keyed(V.check_x(x0, "x0"), seeds, step, generator, noise)
    s = _flow_q_sample_args(x0, sigma, noise, generator)
    return _flow_q_sample(x0, s, noise, gen)


def _flow_q_sample(x0, sigma, noise, generator):
    cd, out_dtype = _dtypes(x0, noise)  # fp32 noise with bf16 x0 gives fp32, as q_sample does
    s = _level(sigma, x0)
    z = _noise(x0, noise, generator, cd)
    xt = _out((1 - s).to(cd) * x0.to(cd) + s.to(cd) * z, x0, out_dtype)
    return xt, (_out(z, x0, out_dtype) if noise is None else noise)


# ---- LCM -----------------------------------------------------------------------------
class _LcmArgs:
    __slots__ = ("t", "t_prev", "table", "prediction", "timestep_scaling", "sigma_data", "clip",
                 "return_denoised")


def _lcm_args(x, model_output, t, t_prev, schedule, prediction_type, timestep_scaling, sigma_data, clip_sample,
              noise, generator, return_denoised) -> _LcmArgs:
    V.check_x(x)
    V.check_operand(x, model_output, "model_output")
    sched = V.check_schedule(schedule)
    a = _LcmArgs()
    t_int = V._as_int(t)
    t = t if t_int is None else t_int
    # both checked on the host where they are there (the order check included), then moved
    # to x's device together: the kernel reads both beside the device table
    t_host = V.check_timesteps_host(t, x, sched.num_timesteps)
    tp_int = V._as_int(t_prev)
    t_prev = t_prev if tp_int is None else tp_int
    a.t_prev = V._move(V.check_t_prev(t_prev, t_host, x, sched.num_timesteps, t), x)
    a.t = V._move(t_host, x)
    a.prediction = V.check_prediction_type(prediction_type)
    a.timestep_scaling = V.check_nonneg(timestep_scaling, "timestep_scaling")
    a.sigma_data = V.check_positive(sigma_data, "sigma_data")
    a.clip = V.check_clip(clip_sample)
    if noise is not None:
        V.check_operand(x, noise, "noise")
    V.check_generator(generator, x, noise)
    V.check_zero_snr(sched, a.t, a.prediction)
    if not isinstance(return_denoised, bool):
        raise TypeError(f"return_denoised must be a bool, got {type(return_denoised).__name__}")
    a.return_denoised = return_denoised
    a.table = sched.table(x.device)
    return a


def lcm_step(x, model_output, t, t_prev, *, schedule=None, prediction_type="epsilon", timestep_scaling=10.0,
             sigma_data=0.5, clip_sample=None, noise=None, generator=None, return_denoised=False, seeds=None,
             step=None):
    """One latent-consistency step (diffusers' LCMScheduler.step) from timestep ``t`` to
    ``t_prev`` (``t_prev < 0``: the final step, no noise)."""
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = _lcm_args(x, model_output, t, t_prev, schedule, prediction_type, timestep_scaling, sigma_data, clip_sample,
                  noise, generator, return_denoised)
    return _lcm(x, model_output, a, noise, gen)


def _lcm(x, m, a: _LcmArgs, noise, generator):
    # the noise promotes even where every t_prev < 0 (as ddim_step's final step): the
    # dtype never depends on values that may live on a device
    cd, out_dtype = _dtypes(x, m, noise)
    ab = _per_sample(_lookup(a.table, a.t, False), x)
    ab_prev = _per_sample(_lookup(a.table, a.t_prev, True), x)  # 1 where t_prev < 0
    # boundary condition c_skip(0) = 1, c_out(0) = 0 (Song et al. 2023, eq. 7; LCM's discrete form)
    scaled_t = _per_sample(a.t.to(torch.float64), x) * a.timestep_scaling
    c_skip = a.sigma_data**2 / (scaled_t**2 + a.sigma_data**2)
    c_out = scaled_t / (scaled_t**2 + a.sigma_data**2).sqrt()
    xc, mc = x.to(cd), m.to(cd)
    sa, s1a = ab.sqrt().to(cd), (1 - ab).sqrt().to(cd)
    if a.prediction == V.PREDICTION_TYPES["epsilon"]:
        x0 = (xc - s1a * mc) / sa
    elif a.prediction == V.PREDICTION_TYPES["sample"]:
        x0 = mc
    else:
        x0 = sa * xc - s1a * mc
    if a.clip is not None:
        x0 = x0.clamp(-a.clip, a.clip)
    den = c_out.to(cd) * x0 + c_skip.to(cd) * xc
    z = _noise(x, noise, generator, cd)
    final = _per_sample(a.t_prev < 0, x)
    x_prev = torch.where(final, den, ab_prev.sqrt().to(cd) * den + (1 - ab_prev).sqrt().to(cd) * z)
    x_prev = _out(x_prev, x, out_dtype)
    return (x_prev, _out(den, x, out_dtype)) if a.return_denoised else x_prev


# ---- linear_step: the multistep solvers' update ----------------------------------------
MAX_LINEAR_INPUTS = 6
MAX_LINEAR_OUTPUTS = 3


def _coeff_table(c, x: torch.Tensor, name: str, ndim: int):
    """Coefficients as given -> a host tuple (nested) of floats, or a float64 tensor on
    x's device with a leading per-sample axis of 1 or B."""
    if isinstance(c, torch.Tensor):
        if not c.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {c.dtype}")
        if c.dim() == ndim:
            c = c.unsqueeze(0)
        if c.dim() != ndim + 1 or c.shape[0] not in (1, V._batch(x)):
            raise ValueError(f"{name} must have {ndim} dims, or {ndim + 1} with a leading batch axis of 1 or "
                             f"B={V._batch(x)}; got shape {tuple(c.shape)}")
        if c.device.type != "cpu" and c.device != x.device:
            raise V.MismatchError(f"{name} is on {c.device} but x is on {x.device}")
        if c.device.type == "cpu" and not V._compiling() and not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name} must be finite")
        return c.to(device=x.device, dtype=torch.float64)
    try:
        t = tuple(tuple(float(v) for v in row) for row in c) if ndim == 2 else tuple(float(v) for v in c)
    except TypeError:
        raise TypeError(f"{name} must be a {'sequence of rows of numbers' if ndim == 2 else 'sequence of numbers'} "
                        f"or a float tensor") from None
    flat = [v for row in t for v in row] if ndim == 2 else list(t)
    if not all(math.isfinite(v) for v in flat):
        raise ValueError(f"{name} must be finite")
    return t


def _shape_of(c) -> tuple:
    """(K, J) of a coefficient table, (K,) of noise coefficients (without the batch axis)."""
    if isinstance(c, torch.Tensor):
        return tuple(c.shape[1:])
    if c and isinstance(c[0], tuple):
        return (len(c), len(c[0]))
    return (len(c),)


def _linear_args(inputs, coeffs, noise_coeffs, noise, generator):
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError("inputs must be a list or tuple of tensors (x first)")
    if not 1 <= len(inputs) <= MAX_LINEAR_INPUTS:
        raise ValueError(f"linear_step takes 1 to {MAX_LINEAR_INPUTS} inputs, got {len(inputs)}")
    x = V.check_x(inputs[0], "inputs[0]")
    for j, t in enumerate(inputs[1:], 1):
        V.check_operand(x, t, f"inputs[{j}]")
    c = _coeff_table(coeffs, x, "coeffs", 2)
    K, J = _shape_of(c)
    if not 1 <= K <= MAX_LINEAR_OUTPUTS:
        raise ValueError(f"coeffs must have 1 to {MAX_LINEAR_OUTPUTS} rows (one per output), got {K}")
    if J != len(inputs) or (not isinstance(c, torch.Tensor) and any(len(row) != J for row in c)):
        raise ValueError(f"each row of coeffs must have one coefficient per input ({len(inputs)})")
    cn = None
    if noise_coeffs is not None:
        cn = _coeff_table(noise_coeffs, x, "noise_coeffs", 1)
        if _shape_of(cn) != (K,):
            raise ValueError(f"noise_coeffs must have one coefficient per output ({K}), got shape {_shape_of(cn)}")
        if noise is not None:
            V.check_operand(x, noise, "noise")
        V.check_generator(generator, x, noise)
    elif noise is not None or generator is not None:
        raise ValueError("noise/generator/seeds given but noise_coeffs is None (the step would not use them)")
    return c, cn, K


def _as_table(c, x: torch.Tensor) -> torch.Tensor:
    return c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64, device=x.device).unsqueeze(0)


def linear_step(inputs, coeffs, *, noise_coeffs=None, noise=None, generator=None, seeds=None, step=None):
    """``out_k = sum_j coeffs[k][j] inputs[j] + noise_coeffs[k] z`` (see
    :func:`diffkern.sampler_ops.linear_step`)."""
    gen = _rng.keyed(V.check_x(inputs[0], "inputs[0]") if isinstance(inputs, (list, tuple)) and inputs
                     else inputs, seeds, step, generator, noise)
    a = _linear_args(inputs, coeffs, noise_coeffs, noise, generator)
    return _linear(list(inputs), *a, noise, gen)


def _linear(inputs, c, cn, K, noise, generator):
    x = inputs[0]
    cd, out_dtype = _dtypes(*inputs, noise if cn is not None else None)
    table = _as_table(c, x)  # (1 or B, K, J) float64
    z = None if cn is None else _noise(x, noise, generator, cd)
    ntab = None if cn is None else (cn if isinstance(cn, torch.Tensor) else _as_table(cn, x))  # (1 or B, K)
    outs = []
    for k in range(K):
        acc = None
        for j, t in enumerate(inputs):
            term = _per_sample(table[:, k, j], x).to(cd) * t.to(cd)
            acc = term if acc is None else acc + term
        if z is not None:
            cz = _per_sample(ntab[:, k], x)
            # a select, not 0 * z: a sample whose noise coefficient is 0 takes no noise at all
            acc = torch.where(cz != 0, acc + cz.to(cd) * z, acc)
        outs.append(_out(acc, x, out_dtype))
    return tuple(outs)
