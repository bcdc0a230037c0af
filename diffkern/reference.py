"""Pure-PyTorch implementations of every diffkern op: the fallback and the test oracle.

This file is the math: it converts arguments (ints to tensors, names to codes) and checks
nothing. The public functions check first, natively in C++ or, on the fallback path,
with diffkern/_validate.py before calling the functions here.

Each op accepts float64 (and then computes in float64), so the native kernels are tested
against this file evaluated in float64. Per-sample coefficients are formed in float64 from
the float32 ``alphas_cumprod`` table, with the cancellation-free forms the kernels use
(``_step_coefficients``); elementwise math runs in float32 for half/bfloat16/float32
inputs and in float64 for float64 inputs. The in-kernel noise is reproduced exactly by
:mod:`diffkern._rng`, so ``generator=`` gives the same numbers here as natively.

Formulas (``ab = alphas_cumprod[t]``, ``ab' = alphas_cumprod[t_prev]`` or 1 if t_prev < 0,
``m`` the model output, see REFERENCE_SEMANTICS.md):

- x0 / eps from m: epsilon ``x0 = (x - sqrt(1-ab) m)/sqrt(ab)``; sample ``x0 = m``,
  ``eps = (x - sqrt(ab) m)/sqrt(1-ab)``; v ``x0 = sqrt(ab) x - sqrt(1-ab) m``,
  ``eps = sqrt(ab) m + sqrt(1-ab) x``. ``clip_sample=c`` clamps x0 (eps stays unclipped).
- DDIM: ``x' = sqrt(ab') x0 + sqrt(1-ab'-std^2) eps + std z``, ``std = eta sqrt(var)``,
  ``var = (1-ab')/(1-ab) (1 - ab/ab')``.
- DDPM: ``mean = sqrt(ab') b/(1-ab) x0 + sqrt(a)(1-ab')/(1-ab) x`` with ``a = ab/ab'``,
  ``b = 1-a``; std ``sqrt(max((1-ab')/(1-ab) b, 1e-20))`` (fixed_small) or ``sqrt(b)``
  (fixed_large); no noise where t == 0.
"""

from __future__ import annotations

import math

import torch

from . import _rng
from ._reference_common import _compute_dtype, _draw, _lookup, _per_sample
from ._validate import StepArgs  # noqa: F401  (the validated arguments' record)
from .schedules import NoiseSchedule, default_schedule

__all__ = ["q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
           "gmm_annealed_langevin", "step_coefficients"]


_PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_VARIANCE = {"fixed_small": 0, "fixed_large": 1}


def _result_dtype(x: torch.Tensor, *others) -> torch.dtype:
    """Mixed floating inputs promote as in torch (an fp16 model output with fp32 x: fp32)."""
    dt = x.dtype
    for o in others:
        if o is not None and o.dtype != dt:
            dt = torch.promote_types(dt, o.dtype)
    return dt


def _in_format(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The outputs' layout: channels_last stays channels_last, anything else is contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out.contiguous()


def _prediction_coefficients(ab: torch.Tensor, prediction: int):
    """x0 = a0 x + b0 m and eps = a1 x + b1 m."""
    sa, s1a = ab.sqrt(), (1 - ab).sqrt()
    one, zero = torch.ones_like(ab), torch.zeros_like(ab)
    if prediction == 0:  # epsilon; undefined (NaN, not inf) where ab == 0: a zero terminal SNR
        nan = torch.full_like(ab, float("nan"))
        ok = ab > 0
        return (torch.where(ok, 1 / sa, nan), torch.where(ok, -s1a / sa, nan), torch.where(ok, zero, nan),
                torch.where(ok, one, nan))
    if prediction == 1:  # sample
        return zero, one, 1 / s1a, -sa / s1a
    return sa, -s1a, s1a, sa  # v_prediction


def step_coefficients(kind: str, ab: torch.Tensor, ab_prev: torch.Tensor, t: torch.Tensor, *, prediction: int,
                      eta: float = 0.0, variance: int = 0):
    """Per-sample coefficients (float64) of ``out = c0 x0 + c1 eps + c2 x + std z``.

    Written without the cancellations of the textbook forms: ``1 - ab/ab'`` is formed as
    ``(ab' - ab)/ab'`` (a difference of nearby table entries is exact), and
    ``1 - ab' - std^2 = (1-ab')/(1-ab) ((1-eta^2)(1-ab) + eta^2 ab (1-ab')/ab')``."""
    a0, b0, a1, b1 = _prediction_coefficients(ab, prediction)
    beta = (ab_prev - ab) / ab_prev  # effective beta over the jump t -> t_prev
    r = (1 - ab_prev) / (1 - ab)
    if kind == "ddim":
        var = r * beta
        std = eta * var.clamp_min(0).sqrt()
        dir2 = r * ((1 - eta * eta) * (1 - ab) + eta * eta * ab * (1 - ab_prev) / ab_prev)
        c0, c1, c2 = ab_prev.sqrt(), dir2.clamp_min(0).sqrt(), torch.zeros_like(ab)
    elif kind == "ddpm":
        c0 = ab_prev.sqrt() * beta / (1 - ab)
        c2 = (ab / ab_prev).sqrt() * r
        c1 = torch.zeros_like(ab)
        var = (r * beta).clamp_min(1e-20) if variance == 0 else beta
        std = torch.where(t > 0, var.sqrt(), torch.zeros_like(var))
    else:
        raise ValueError(kind)
    return a0, b0, a1, b1, c0, c1, c2, std


def _apply_step(x, m, coeffs, clip, noise, out_dtype):
    cd = _compute_dtype(out_dtype)
    a0, b0, a1, b1, c0, c1, c2, std = (c.to(cd) for c in coeffs)
    xc, mc = x.to(cd), m.to(cd)
    x0 = a0 * xc + b0 * mc
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c0 * x0 + c1 * (a1 * xc + b1 * mc) + c2 * xc
    if noise is not None:
        out = out + std * noise.to(cd)
    return _in_format(out.to(out_dtype), x)


def _timesteps(t, x: torch.Tensor) -> torch.Tensor:
    """int / 0-d / 1-D integer timesteps -> an int64 (n,) tensor on x's device; N-D ones
    (broadcasting to x's shape) keep their shape."""
    if isinstance(t, torch.Tensor):
        return (t.reshape(-1) if t.dim() <= 1 else t).to(device=x.device, dtype=torch.int64)
    return torch.tensor([int(t)], dtype=torch.int64, device=x.device)


def _clip(c):
    if c is None or c is False:
        return None
    return 1.0 if c is True else float(c)


# ---- public reference ops ----------------------------------------------------------
def q_sample(x0, t, noise=None, *, schedule=None, generator=None, seeds=None, step=None):
    """Forward noising ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` with ``t`` shared, per
    sample or broadcasting to x0 (:func:`diffkern.ops.q_sample`);
    returns ``(x_t, noise)``. Noise is drawn (Philox, see :mod:`diffkern._rng`) when not given."""
    generator = _rng.keyed(x0, seeds, step, generator, noise)
    sched = schedule if schedule is not None else default_schedule()
    return _q_sample(x0, _timesteps(t, x0), sched.table(x0.device), noise, generator)


def _q_sample(x0, t, table, noise, generator):
    out_dtype = _result_dtype(x0, noise)
    cd = _compute_dtype(out_dtype)
    ab = _per_sample(_lookup(table, t, False), x0)
    z = _draw(x0, generator, out_dtype) if noise is None else noise
    xt = ab.sqrt().to(cd) * x0.to(cd) + (1 - ab).sqrt().to(cd) * z.to(cd)
    return _in_format(xt.to(out_dtype), x0), (_in_format(z.to(out_dtype), x0) if noise is None else noise)


def ddim_step(x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon", clip_sample=None,
              noise=None, generator=None, seeds=None, step=None):
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev`` (default ``t-1``)."""
    generator = _rng.keyed(x, seeds, step, generator, noise)
    a = _step_args(x, t, t_prev, schedule, prediction_type, clip_sample)
    return _ddim(x, eps, a, float(eta), noise, generator)


def _lookups(a, x):
    """(alphas_cumprod[t], alphas_cumprod[t_prev], t), each broadcastable against x: t
    and t_prev are aligned with x first, so a (B,) t beside a per-frame t_prev pairs each
    sample's t with its frames' t_prev (torch would align the (B,) with x's last dim).
    ab' is NaN where t_prev >= t (only reachable with device-resident timesteps, which are
    never read back to check), as the kernels do."""
    t, tp = _per_sample(a.t, x), _per_sample(a.t_prev, x)
    ab, abp = _lookup(a.table, t, False), _lookup(a.table, tp, True)
    if a.t_prev_arg is not None:
        abp = torch.where(tp < t, abp, torch.full_like(abp, float("nan")))
    return ab, abp, t


def _ddim(x, m, a, eta, noise, generator):
    ab, abp, t = _lookups(a, x)
    coeffs = step_coefficients("ddim", ab, abp, t, prediction=a.prediction, eta=eta)
    out_dtype = _result_dtype(x, m, noise if eta > 0 else None)
    if eta > 0 and noise is None:
        noise = _draw(x, generator, out_dtype)
    return _apply_step(x, m, coeffs, a.clip, noise if eta > 0 else None, out_dtype)


def ddpm_step(x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
              clip_sample=None, noise=None, generator=None, seeds=None, step=None):
    """One ancestral DDPM step (Ho et al. 2020, Algorithm 2) from ``t`` to ``t_prev``."""
    generator = _rng.keyed(x, seeds, step, generator, noise)
    a = _step_args(x, t, t_prev, schedule, prediction_type, clip_sample)
    return _ddpm(x, eps, a, _VARIANCE[variance], noise, generator)


def _ddpm(x, m, a, variance, noise, generator):
    ab, abp, t = _lookups(a, x)
    coeffs = step_coefficients("ddpm", ab, abp, t, prediction=a.prediction, variance=variance)
    out_dtype = _result_dtype(x, m, noise)
    if noise is None:
        noise = _draw(x, generator, out_dtype)
    return _apply_step(x, m, coeffs, a.clip, noise, out_dtype)


def _step_args(x, t, t_prev, schedule, prediction_type, clip_sample) -> StepArgs:
    a = StepArgs()
    a.schedule = schedule if isinstance(schedule, NoiseSchedule) else default_schedule()
    a.t = _timesteps(t, x)
    a.t_prev_arg = None if t_prev is None else _timesteps(t_prev, x).clamp_min(-1)
    a.prediction = _PREDICTION[prediction_type]
    a.clip = _clip(clip_sample)
    a.table = a.schedule.table(x.device)
    return a


def langevin_step(x, score, step_size, *, noise=None, generator=None, seeds=None, step=None):
    """``x + step_size * score + sqrt(2 * step_size) * z`` (the NCSN code's convention; the
    NCSN paper's ``epsilon`` is ``2 * step_size``)."""
    generator = _rng.keyed(x, seeds, step, generator, noise)
    return _langevin(x, score, float(step_size), noise, generator)


def _langevin(x, score, step, noise, generator):
    out_dtype = _result_dtype(x, score, noise)
    cd = _compute_dtype(out_dtype)
    z = _draw(x, generator, out_dtype) if noise is None else noise.to(cd)
    return _in_format((x.to(cd) + step * score.to(cd) + math.sqrt(2 * step) * z).to(out_dtype), x)


def annealed_langevin(score_fn, x, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False, generator=None,
                      callback=None, seeds=None, _step=None):
    """NCSN annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1, code convention).

    For each level ``i`` (sigmas descending) with ``alpha_i = step_lr * (sigma_i/sigma_L)^2``,
    runs ``n_steps_each`` steps ``x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z``; with
    ``denoise=True`` ends with NCSNv2's ``x <- x + sigma_L^2 s(x, sigma_L)``. The state is
    never clamped. ``callback(level, step, sigma, x)`` runs after every step. ``seeds=``:
    per-sample keys, chain step ``k`` (over all levels, from 0) drawing with ``step=k``."""
    s = _sigmas(sigmas)
    n, lr = int(n_steps_each), float(step_lr)
    if _step is None:
        def _step(x_, sc, a, k):
            if seeds is not None:
                return langevin_step(x_, sc, a, seeds=seeds, step=k)
            return langevin_step(x_, sc, a, generator=generator)
    sigma_L = float(s[-1])
    k = 0
    for i, sigma in enumerate(s.tolist()):
        alpha = lr * (sigma / sigma_L) ** 2
        for j in range(n):
            x = _step(x, score_fn(x, sigma), alpha, k)
            k += 1
            if callback is not None:
                callback(i, j, sigma, x)
    if denoise:
        x = x + sigma_L**2 * score_fn(x, sigma_L)
    return x


def gmm_score(x, weights, means, stds, sigma):
    """Exact score of ``sum_k w_k N(mu_k, diag(s_k^2))`` convolved with ``N(0, sigma^2 I)``:
    ``sum_k r_k(x) (mu_k - x)/(s_k^2 + sigma^2)``, ``r`` = softmax_k of ``log w_k + log N_k(x)``.
    ``x`` is (..., D); ``means`` (K, D); ``stds`` (K, D) or (K,)."""
    return _gmm_score(x, mixture(x, weights, means, stds), float(sigma))


class Mixture:
    """weights (K,), means (K, D), stds (K, D), in x's compute dtype."""

    __slots__ = ("weights", "means", "stds")

    def __init__(self, weights, means, stds):
        self.weights, self.means, self.stds = weights, means, stds


def mixture(x, weights, means, stds) -> Mixture:
    dt = _compute_dtype(x)
    K, D = weights.numel(), x.shape[-1]
    if stds.dim() == 1:
        stds = stds[:, None].expand(K, D)
    return Mixture(weights.to(dt), means.to(dt), stds.to(dt).contiguous())


def _sigmas(sigmas) -> torch.Tensor:
    if isinstance(sigmas, torch.Tensor):
        return sigmas.detach().to("cpu", torch.float64).reshape(-1)
    return torch.tensor(list(sigmas), dtype=torch.float64)


def _gmm_score(x, mix, sigma):
    cd = _compute_dtype(x)
    xc = x.to(cd)[..., None, :]                         # (..., 1, D)
    var = mix.stds.to(cd) ** 2 + sigma * sigma          # (K, D)
    diff = mix.means.to(cd) - xc                        # (..., K, D)
    logp = torch.log(mix.weights.to(cd)) - 0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1)
    r = torch.softmax(logp, dim=-1)                     # (..., K)
    return (r[..., None] * diff / var).sum(-2).to(x.dtype)


def gmm_annealed_langevin(x, weights, means, stds, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False,
                          generator=None):
    """Annealed Langevin on the exact score of a Gaussian mixture (see :func:`gmm_score`).

    The whole chain draws from one generator position: step ``k`` (``k = level *
    n_steps_each + step``) uses the normals at logical indices ``k*N*D .. (k+1)*N*D - 1``
    with ``N*D = x.numel()``, so the fused kernel and this loop draw identical noise."""
    mix = mixture(x, weights, means, stds)
    s, n, lr = _sigmas(sigmas), int(n_steps_each), float(step_lr)
    seed, offset = _rng.generator_key(generator, x.device)
    return _gmm_loop(x, mix, s, n, lr, denoise, seed, offset)


def _gmm_loop(x, mix, s, n, lr, denoise, seed, offset):
    cd = _compute_dtype(x)
    xc = x.to(cd)
    N = x.numel()
    sigma_L = float(s[-1])
    k = 0
    for sigma in s.tolist():
        alpha = lr * (sigma / sigma_L) ** 2
        for _ in range(n):
            z = _rng.philox_normal(N, seed, offset, start=k * N, device=x.device).reshape(x.shape).to(cd)
            xc = xc + alpha * _gmm_score(xc, mix, sigma) + math.sqrt(2 * alpha) * z
            k += 1
    if denoise:
        xc = xc + sigma_L**2 * _gmm_score(xc, mix, sigma_L)
    return xc.to(x.dtype)


# ---- Sampler families (k-diffusion / diffusers) ---------------------------------------
# Euler, Euler ancestral, Heun, DPM-Solver++(2M), flow matching and LCM live in
# reference_samplers.py (one module per family of formulas); exported here so that
# dk.reference.<op> names every op.
from .reference_samplers import (  # noqa: E402
    dpmpp_2m_step,
    euler_step,
    flow_q_sample,
    flow_step,
    heun_step,
    lcm_step,
    linear_step,
)

__all__ += ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step", "linear_step"]
