"""Pure-PyTorch implementations of every diffkern op: the fallback and the test oracle.

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
from . import _validate as V

__all__ = ["q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
           "gmm_annealed_langevin", "step_coefficients"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or (1,) -> broadcastable against x (B, ...)."""
    return v.reshape(v.shape[0], *([1] * max(x.dim() - 1, 0))) if x.dim() > 0 else v.reshape(())


def _lookup(table: torch.Tensor, t: torch.Tensor, allow_final: bool) -> torch.Tensor:
    """alphas_cumprod[t] in float64; 1.0 where t < 0 (the final step) if allow_final; NaN
    where t is out of range (only possible for device-resident t, never checked on host)."""
    T = table.numel()
    valid = (t >= 0) & (t < T) if not allow_final else (t < T)
    ab = table.to(torch.float64)[t.clamp(0, T - 1)]
    if allow_final:
        ab = torch.where(t < 0, torch.ones_like(ab), ab)
    return torch.where(valid, ab, torch.full_like(ab, float("nan")))


def _prediction_coefficients(ab: torch.Tensor, prediction: int):
    """x0 = a0 x + b0 m and eps = a1 x + b1 m."""
    sa, s1a = ab.sqrt(), (1 - ab).sqrt()
    one, zero = torch.ones_like(ab), torch.zeros_like(ab)
    if prediction == 0:  # epsilon
        return 1 / sa, -s1a / sa, zero, one
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
    cd = _compute_dtype(x)
    a0, b0, a1, b1, c0, c1, c2, std = (_per_sample(c, x).to(cd) for c in coeffs)
    xc, mc = x.to(cd), m.to(cd)
    x0 = a0 * xc + b0 * mc
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c0 * x0 + c1 * (a1 * xc + b1 * mc) + c2 * xc
    if noise is not None:
        out = out + std * noise.to(cd)
    return out.to(out_dtype)


def _draw(x: torch.Tensor, generator) -> torch.Tensor:
    return _rng.normal_like(x.shape, generator, x.device, _compute_dtype(x))


# ---- public reference ops ----------------------------------------------------------
def q_sample(x0, t, noise=None, *, schedule=None, generator=None, seeds=None, step=None):
    """Forward noising ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` with per-sample ``t``;
    returns ``(x_t, noise)``. Noise is drawn (Philox, see :mod:`diffkern._rng`) when not given."""
    x0 = V.check_x(x0, "x0")
    noise = _rng.keyed_noise(x0, seeds, step, generator, noise, native=False)
    sched = V.check_schedule(schedule)
    tt = V.check_timesteps(t, x0, sched.num_timesteps)
    if noise is not None:
        V.check_like(x0, noise, "noise")
    V.check_generator(generator, x0, noise)
    return _q_sample(x0, tt, sched.table(x0.device), noise, generator)


def _q_sample(x0, t, table, noise, generator):
    cd = _compute_dtype(x0)
    ab = _per_sample(_lookup(table, t, False), x0)
    z = _draw(x0, generator) if noise is None else noise
    xt = ab.sqrt().to(cd) * x0.to(cd) + (1 - ab).sqrt().to(cd) * z.to(cd)
    return xt.to(x0.dtype), (z.to(x0.dtype) if noise is None else noise)


def ddim_step(x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon", clip_sample=None,
              noise=None, generator=None, seeds=None, step=None):
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev`` (default ``t-1``)."""
    noise = _rng.keyed_noise(V.check_x(x), seeds, step, generator, noise, draws=_rng.nonzero(eta), native=False)
    a = _step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
    eta = V.check_nonneg(eta, "eta")
    return _ddim(x, eps, a, eta, noise, generator)


def _ddim(x, m, a, eta, noise, generator):
    ab, abp = _lookup(a.table, a.t, False), _lookup(a.table, a.t_prev, True)
    coeffs = step_coefficients("ddim", ab, abp, a.t, prediction=a.prediction, eta=eta)
    if eta > 0 and noise is None:
        noise = _draw(x, generator)
    return _apply_step(x, m, coeffs, a.clip, noise if eta > 0 else None, x.dtype)


def ddpm_step(x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
              clip_sample=None, noise=None, generator=None, seeds=None, step=None):
    """One ancestral DDPM step (Ho et al. 2020, Algorithm 2) from ``t`` to ``t_prev``."""
    noise = _rng.keyed_noise(V.check_x(x), seeds, step, generator, noise, native=False)
    a = _step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
    var = V.check_variance(variance)
    return _ddpm(x, eps, a, var, noise, generator)


def _ddpm(x, m, a, variance, noise, generator):
    ab, abp = _lookup(a.table, a.t, False), _lookup(a.table, a.t_prev, True)
    coeffs = step_coefficients("ddpm", ab, abp, a.t, prediction=a.prediction, variance=variance)
    if noise is None:
        noise = _draw(x, generator)
    return _apply_step(x, m, coeffs, a.clip, noise, x.dtype)


class _StepArgs:
    __slots__ = ("t", "t_prev_arg", "table", "prediction", "clip", "schedule")

    @property
    def t_prev(self):
        """The validated t_prev, or t - 1 (formed only when asked: the native ops form it
        themselves, and each small tensor op costs microseconds per step)."""
        return self.t - 1 if self.t_prev_arg is None else self.t_prev_arg


def _step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator) -> _StepArgs:
    V.check_x(x)
    V.check_like(x, eps, "eps")
    sched = V.check_schedule(schedule)
    a = _StepArgs()
    a.schedule = sched
    # scalar CPU tensors read once as ints: the int path is the cheap one, and a sampling
    # loop calls this every step
    t_int = V._as_int(t)
    t = t if t_int is None else t_int
    a.t = V.check_timesteps(t, x, sched.num_timesteps)
    if t_prev is not None:
        tp_int = V._as_int(t_prev)
        t_prev = t_prev if tp_int is None else tp_int
    a.t_prev_arg = None if t_prev is None else V.check_t_prev(t_prev, a.t, x, sched.num_timesteps, t)
    a.prediction = V.check_prediction_type(prediction_type)
    a.clip = V.check_clip(clip_sample)
    if noise is not None:
        V.check_like(x, noise, "noise")
    V.check_generator(generator, x, noise)
    V.check_zero_snr(sched, a.t, a.prediction)
    a.table = sched.table(x.device)
    return a


def langevin_step(x, score, step_size, *, noise=None, generator=None, seeds=None, step=None):
    """``x + step_size * score + sqrt(2 * step_size) * z`` (the NCSN code's convention; the
    NCSN paper's ``epsilon`` is ``2 * step_size``)."""
    V.check_x(x)
    noise = _rng.keyed_noise(x, seeds, step, generator, noise, native=False)
    V.check_like(x, score, "score")
    step = V.check_nonneg(step_size, "step_size")
    if noise is not None:
        V.check_like(x, noise, "noise")
    V.check_generator(generator, x, noise)
    return _langevin(x, score, step, noise, generator)


def _langevin(x, score, step, noise, generator):
    cd = _compute_dtype(x)
    z = _draw(x, generator) if noise is None else noise.to(cd)
    return (x.to(cd) + step * score.to(cd) + math.sqrt(2 * step) * z).to(x.dtype)


def annealed_langevin(score_fn, x, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False, generator=None,
                      callback=None, seeds=None, _step=None):
    """NCSN annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1, code convention).

    For each level ``i`` (sigmas descending) with ``alpha_i = step_lr * (sigma_i/sigma_L)^2``,
    runs ``n_steps_each`` steps ``x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z``; with
    ``denoise=True`` ends with NCSNv2's ``x <- x + sigma_L^2 s(x, sigma_L)``. The state is
    never clamped. ``callback(level, step, sigma, x)`` runs after every step. ``seeds=``:
    per-sample keys, chain step ``k`` (over all levels, from 0) drawing with ``step=k``."""
    V.check_x(x)
    s = V.check_sigmas(sigmas, x)
    n = V.check_steps(n_steps_each, "n_steps_each")
    lr = V.check_positive(step_lr, "step_lr")
    V.check_generator(generator, x, None)
    _rng.keyed_noise(x, seeds, None, generator, None, draws=False)  # validates seeds
    step = _step or (lambda x_, sc, a, k_=None: langevin_step(x_, sc, a, generator=generator, seeds=seeds,
                                                              step=k_ if seeds is not None else None))
    sigma_L = float(s[-1])
    k = 0
    for i, sigma in enumerate(s.tolist()):
        alpha = lr * (sigma / sigma_L) ** 2
        for j in range(n):
            x = step(x, score_fn(x, sigma), alpha, k)
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
    V.check_x(x)
    mix = V.check_mixture(x, weights, means, stds)
    return _gmm_score(x, mix, V.check_sigma(sigma))


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
    V.check_x(x)
    mix = V.check_mixture(x, weights, means, stds)
    s = V.check_sigmas(sigmas, x)
    n = V.check_steps(n_steps_each, "n_steps_each")
    lr = V.check_positive(step_lr, "step_lr")
    V.check_generator(generator, x, None)
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
)

__all__ += ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step"]
