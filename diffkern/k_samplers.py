"""k-diffusion's samplers on diffkern's fused steps.

``from diffkern.samplers import sample_euler_ancestral`` replaces
``from k_diffusion.sampling import sample_euler_ancestral``: same signatures, same
arithmetic (crowsonkb/k-diffusion ``sampling.py`` and ``external.py``; ComfyUI's
``sample_lcm``), each update one call of a :mod:`diffkern.sampler_ops` op. The two-stage
and multistep samplers (sample_dpm_2, _dpm_2_ancestral, _lms, _dpmpp_2s_ancestral,
_dpmpp_sde, _dpmpp_2m_sde, _dpmpp_3m_sde) make one :func:`diffkern.linear_step` call per
model evaluation, its coefficients formed on the host (per-sample ``sigmas``: a (B, K, J)
float64 table copied to x's device on each call, through pinned memory so the copy is
queued without a host sync; the stage levels handed to the model likewise; shared
``sigmas`` copy nothing).

``model(x, sigma, **extra_args)`` returns the denoised sample, ``sigma`` being
``sigmas[i] * s_in`` (a (B,) tensor) as in k-diffusion. Differences, all opt-in or
invisible to the results:

- Noise: a given ``noise_sampler(sigma, sigma_next)`` is called exactly where k-diffusion
  calls it. Without one, noise is drawn in-kernel from ``generator=`` (keyword-only; the
  Philox stream of the other ops), not by ``torch.randn_like`` — so the stream differs
  from k-diffusion's, and the churn of sample_euler/sample_heun draws only where
  ``gamma > 0`` (k-diffusion draws on every step).
- ``sigmas`` may also be (n+1, B): a schedule per sample (each row is one step; the
  zeros must agree across samples where the sampler branches on them).
- With the :class:`EpsDenoiser` / :class:`VDenoiser` wrappers (and no ``callback``) the
  samplers pass the raw epsilon / v to the ops, which form the denoised sample in the
  same pass (``prediction_type=``) instead of the wrapper spending one more.
- The branches on sigma values read a host copy of ``sigmas`` made once per call (k
  syncs on them every step).
- Step coefficients (``dt``, sigma_down/up, DPM++'s h and r) are formed in float64 from
  the sigma values, where k-diffusion forms them in ``sigmas``' dtype: with float32
  ``sigmas`` and float64 ``x`` the results differ by k-diffusion's float32 rounding of
  those scalars (~1e-7 relative); with float64 ``sigmas`` they agree to float64 rounding.
  Result dtypes are k-diffusion's: sample_euler/_heun/_euler_ancestral promote ``x``
  with ``sigmas``' dtype (k's ``to_d`` does), sample_dpmpp_2m keeps ``x``'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _rng
from . import _validate as V
from .ops import langevin_step
from .sampler_ops import dpmpp_2m_step, euler_step, flow_step, heun_step, linear_step
from .schedules import NoiseSchedule

__all__ = ["append_zero", "get_sigmas_karras", "get_sigmas_exponential", "to_d", "get_ancestral_step",
           "default_noise_sampler", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
           "sample_flow_euler", "sample_lcm", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "DiscreteSchedule", "EpsDenoiser", "VDenoiser",
           "DiscreteEpsDDPMDenoiser", "DiscreteVDDPMDenoiser"]


# ---- k-diffusion's utilities -------------------------------------------------------------
def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions until x has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """The noise levels of Karras et al. (2022), eq. 5, followed by a zero."""
    ramp = torch.linspace(0, 1, n)  # on the CPU, then moved: k-diffusion's numbers on every device
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Noise levels evenly spaced in log sigma, followed by a zero."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) for an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


def _trange(n, disable):
    from tqdm.auto import trange

    return trange(n, disable=disable)


# ---- the sigma schedule, read once ----------------------------------------------------------
class _Levels:
    """``sigmas`` as given (for the model, as k-diffusion passes it) plus one host copy
    (for the branches). Rows are steps; a 2-D ``sigmas`` has one column per sample."""

    def __init__(self, sigmas, x: torch.Tensor):
        if not isinstance(sigmas, torch.Tensor):
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if not sigmas.is_floating_point():
            raise TypeError(f"sigmas must be a floating tensor, got {sigmas.dtype}")
        if sigmas.dim() not in (1, 2) or sigmas.shape[0] < 1:
            raise ValueError(f"sigmas must have shape (n+1,) or (n+1, B), got {tuple(sigmas.shape)}")
        if sigmas.dim() == 2 and sigmas.shape[1] != x.shape[0]:
            raise ValueError(f"sigmas has {sigmas.shape[1]} columns but x has batch size {x.shape[0]}")
        self.dev = sigmas
        self.per_sample = sigmas.dim() == 2
        self.host_native = sigmas.detach().cpu()  # sigmas' dtype: k compares s_tmin <= sigmas[i] in it
        self.host = self.host_native.to(torch.float64)
        self.s_in = x.new_ones([x.shape[0]])

    def __len__(self):
        return self.dev.shape[0]

    def op(self, i, scale: float = 1.0):
        """sigmas[i] (times scale) as the ops take it: a float, or the (B,) row."""
        if self.per_sample:
            return self.dev[i] * scale if scale != 1.0 else self.dev[i]
        return float(self.host[i]) * scale

    def model(self, i, scale: float = 1.0):
        """sigmas[i] (times scale) * s_in, as k-diffusion hands it to the model."""
        s = self.dev[i] * (scale) if scale != 1.0 else self.dev[i]
        return s if self.per_sample else s * self.s_in

    def zero(self, i) -> bool:
        """Whether sigmas[i] is 0 (for every sample)."""
        z = self.host[i] == 0
        if self.per_sample and bool(z.any()) != bool(z.all()):
            raise ValueError(f"per-sample sigmas must reach 0 at the same step (row {i} mixes zeros and non-zeros)")
        return bool(z.all())

    def promote(self, x: torch.Tensor) -> torch.Tensor:
        """x in the dtype k-diffusion's ``x + to_d(x, sigma, denoised) * dt`` has: to_d's
        ``append_dims(sigma)`` is a dimensioned tensor, so sigmas' dtype takes part in the
        promotion (float32 x with float64 sigmas leaves the step in float64)."""
        dt = torch.promote_types(x.dtype, self.dev.dtype)
        return x if x.dtype == dt else x.to(dt)

    def positive(self, i) -> bool:
        return bool((self.host[i] > 0).any())

    def scalar(self, i):
        """sigmas[i] as k-diffusion hands it to noise_sampler and callback."""
        return self.dev[i]


def _denoise(model, x, sigma, extra_args, fuse: bool):
    """(model output, prediction_type): the raw epsilon / v of a diffkern wrapper when the
    step op may form the denoised sample itself, else model(...)'s denoised sample."""
    if fuse and isinstance(model, DiscreteSchedule) and model.prediction_type != "sample":
        return model.model_output(x, sigma, **extra_args), model.prediction_type
    return model(x, sigma, **extra_args), "sample"


def _churn_gamma(levels, i, s_churn, s_tmin, s_tmax):
    s = levels.host_native[i]  # a float32 sigma is compared with float32 s_tmin/s_tmax, as in k-diffusion
    inside = bool(((s_tmin <= s) & (s <= s_tmax)).all()) if levels.per_sample else bool(s_tmin <= s <= s_tmax)
    if levels.per_sample and not inside and bool(((s_tmin <= s) & (s <= s_tmax)).any()):
        raise ValueError(f"per-sample sigmas must all be inside or all outside [s_tmin, s_tmax] (row {i})")
    return min(s_churn / (len(levels) - 1), 2 ** 0.5 - 1) if inside else 0.


def _add_noise(x, scale, generator, seeds=None, i=0):
    """x + scale z with z drawn in-kernel from generator (the ops' Philox stream). For a
    scalar scale that is langevin_step with a zero score and step_size = scale^2/2: one
    fused pass with the draw. A per-sample scale draws the same stream and adds it.
    With ``seeds``: z keyed by (seeds[b], step=i)."""
    if seeds is not None and isinstance(scale, torch.Tensor):
        scale = append_dims(scale.to(x.device), x.ndim)
        return (x + scale * _rng.keyed_noise(x, seeds, i, generator)).to(x.dtype)
    if seeds is not None:  # the keyed draw in the step's own pass
        return langevin_step(x, x.new_zeros(()).expand(x.shape), scale * scale / 2, seeds=seeds, step=i)
    if isinstance(scale, torch.Tensor):
        z = _rng.normal_like(x.shape, generator, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        return (x + append_dims(scale.to(x.device), x.ndim) * z).to(x.dtype)
    return langevin_step(x, x.new_zeros(()).expand(x.shape), scale * scale / 2, generator=generator)


def _add_churn(x, levels, i, gamma, s_noise, generator, seeds=None):
    """k-diffusion's churn before the model: x + s_noise sqrt(sigma_hat^2 - sigma^2) z."""
    scale = s_noise * math.sqrt(gamma * (gamma + 2))  # sqrt(sigma_hat^2 - sigma^2) / sigma
    return _add_noise(x, levels.op(i, scale), generator, seeds, i)


def _keyed_check(x, seeds, generator, noise_sampler=None):
    """seeds= of the samplers (step i of the loop draws with step=i): excludes generator
    and noise_sampler."""
    if seeds is not None and noise_sampler is not None:
        raise ValueError("pass either seeds or noise_sampler, not both")
    _rng.keyed(x, seeds, None, generator)


# ---- samplers --------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, generator=None, seeds=None):
    """Algorithm 2 (Euler steps) from Karras et al. (2022), with churn."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator)
    for i in _trange(len(levels) - 1, disable):
        gamma = _churn_gamma(levels, i, s_churn, s_tmin, s_tmax)
        if gamma > 0:
            x = _add_churn(x, levels, i, gamma, s_noise, generator, seeds)
        m, pt = _denoise(model, x, levels.model(i, gamma + 1), extra_args, callback is None)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i) * (gamma + 1),
                      'denoised': m})
        x = euler_step(levels.promote(x), m, levels.op(i, gamma + 1), levels.op(i + 1), prediction_type=pt)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator=None, seeds=None):
    """Ancestral sampling with Euler method steps."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    for i in _trange(len(levels) - 1, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, callback is None)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        x = levels.promote(x)
        if levels.positive(i + 1):
            noise = noise_sampler(levels.scalar(i), levels.scalar(i + 1)) if noise_sampler is not None else None
            keyed = seeds is not None and noise is None and eta > 0
            x = euler_step(x, m, levels.op(i), levels.op(i + 1), eta=eta, s_noise=s_noise, prediction_type=pt,
                           noise=noise, generator=generator if noise is None and eta > 0 else None,
                           seeds=seeds if keyed else None, step=i if keyed else None)
        else:  # the last step: sigma_down = sigma_up = 0
            x = euler_step(x, m, levels.op(i), levels.op(i + 1), prediction_type=pt)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., *, generator=None, seeds=None):
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022)."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator)
    fuse = callback is None
    for i in _trange(len(levels) - 1, disable):
        gamma = _churn_gamma(levels, i, s_churn, s_tmin, s_tmax)
        if gamma > 0:
            x = _add_churn(x, levels, i, gamma, s_noise, generator, seeds)
        sigma_hat = levels.op(i, gamma + 1)
        m, pt = _denoise(model, x, levels.model(i, gamma + 1), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i) * (gamma + 1),
                      'denoised': m})
        x = levels.promote(x)
        x_2 = euler_step(x, m, sigma_hat, levels.op(i + 1), prediction_type=pt)
        if levels.zero(i + 1):
            x = x_2  # Euler method
        else:  # Heun's method
            m_2, _ = _denoise(model, x_2, levels.model(i + 1), extra_args, fuse)
            x = heun_step(x, m, x_2, m_2, sigma_hat, levels.op(i + 1), prediction_type=pt)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M)."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    old_denoised = None
    for i in _trange(len(levels) - 1, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, callback is None)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        sigma_prev = levels.op(i - 1) if old_denoised is not None else None
        if pt == "sample":
            x = dpmpp_2m_step(x, m, old_denoised, levels.op(i), levels.op(i + 1), sigma_prev)
            old_denoised = m
        else:
            x, old_denoised = dpmpp_2m_step(x, m, old_denoised, levels.op(i), levels.op(i + 1), sigma_prev,
                                            prediction_type=pt, return_denoised=True)
    return x


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, stochastic=False,
                      noise_sampler=None, *, generator=None, seeds=None):
    """Flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler) for a velocity model:
    ``v = model(x, sigma, **extra_args)`` on ``x = (1 - sigma) x0 + sigma z``; ``sigmas``
    from 1 (noise) down to 0. ``stochastic=True`` re-noises every step as diffusers'
    ``stochastic_sampling`` (noise from ``noise_sampler(sigma, sigma_next)``, called on every
    step as diffusers draws, or in-kernel from ``generator``)."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    for i in _trange(len(levels) - 1, disable):
        v = model(x, levels.model(i), **extra_args)
        if callback is not None:
            s = append_dims(levels.model(i).to(x.dtype), x.ndim)
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i),
                      'denoised': x - s * v})
        noise = noise_sampler(levels.scalar(i), levels.scalar(i + 1)) if stochastic and noise_sampler else None
        keyed = seeds is not None and stochastic
        x = flow_step(x, v, levels.op(i), levels.op(i + 1), stochastic=stochastic, noise=noise,
                      generator=generator if stochastic and noise is None else None,
                      seeds=seeds if keyed else None, step=i if keyed else None)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
               generator=None, seeds=None):
    """Latent-consistency sampling as ComfyUI's k-diffusion ``sample_lcm``: ``x = D(x; sigma)``,
    then re-noised to the next level, ``x = D + sigma_next z`` (the VE form of LCMScheduler's
    ``sqrt(ab') D + sqrt(1-ab') z``), except at the last step. ``model`` returns the
    denoised sample including the consistency boundary condition (c_skip, c_out);
    :func:`diffkern.lcm_step` is the same step on diffusers' VP state and timesteps."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    for i in _trange(len(levels) - 1, disable):
        denoised = model(x, levels.model(i), **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': denoised})
        x = denoised
        if levels.positive(i + 1):
            if noise_sampler is not None:
                sn = levels.scalar(i + 1)
                x = x + noise_sampler(levels.scalar(i), sn) * (append_dims(sn, x.ndim) if sn.dim() else sn)
            else:
                x = _add_noise(x, levels.op(i + 1), generator, seeds, i)
    return x


# ---- the two-stage and multistep samplers on linear_step -------------------------------------
# Each update below is ONE call of :func:`diffkern.linear_step` per model evaluation: its
# outputs are linear combinations of x, the model output, the kept history and one noise
# draw, with coefficients formed in float64 on the host from the host copy of ``sigmas``.
# A linear combination is written as a dict {tensor name: coefficient}; a coefficient is a
# float64 numpy scalar (shared levels) or a (B,) array (per-sample levels).
def _hs(levels, i):
    """sigmas[i] in float64 on the host: a numpy scalar, or the (B,) row."""
    return levels.host[i].numpy()


def _all_or_none(mask, what: str) -> bool:
    """A host branch condition; per-sample levels must agree on it (one code path)."""
    m = np.asarray(mask)
    if m.ndim and bool(m.any()) != bool(m.all()):
        raise ValueError(f"per-sample sigmas must agree on {what} across the batch")
    return bool(m.all())


def _anc_host(sigma_from, sigma_to, eta):
    """get_ancestral_step in float64 on the host (elementwise on (B,) rows)."""
    if not eta:
        return sigma_to, np.zeros_like(sigma_to)
    sigma_up = np.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _den(pt, sigma, x_name, m_name):
    """The denoised sample as a combination of the model's input and raw output: the
    conversion of the :class:`EpsDenoiser` / :class:`VDenoiser` wrappers, folded into the
    step's coefficients (``sample``: the output itself)."""
    if pt == "sample":
        return {m_name: 1.0}
    if pt == "epsilon":
        return {x_name: 1.0, m_name: -sigma}
    return {x_name: 1.0 / (sigma * sigma + 1), m_name: -sigma / np.sqrt(sigma * sigma + 1)}


def _lc(*terms):
    """sum of coef * combination."""
    out = {}
    for c, e in terms:
        for k, v in e.items():
            out[k] = out.get(k, 0.0) + c * v
    return out


_X = {"x": 1.0}


def _nonzero(c) -> bool:
    return bool(np.any(np.asarray(c) != 0))


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table onto ``device`` without a host sync: a plain ``.to(cuda)`` of
    pageable memory waits for the stream; from pinned memory with ``non_blocking`` the copy
    is queued on the stream (the caching host allocator keeps the buffer until it ran)."""
    if device.type == "cpu":
        return table
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _combine(levels, tensors, rows, noise_coeffs=None, noise=None, generator=None, seeds=None, step=None):
    """linear_step over the named tensors: x first, then those with a nonzero coefficient
    (the others are not read). Per-sample coefficients go as a (B, K, J) float64 tensor
    built on the host and copied to x's device: one small queued copy per call, the price
    of a per-sample schedule (shared levels pass plain floats)."""
    keys = ["x"] + [k for k in tensors if k != "x" and any(_nonzero(r.get(k, 0.0)) for r in rows)]
    if noise_coeffs is not None and not any(_nonzero(c) for c in noise_coeffs):
        noise_coeffs = None  # nothing to add: no draw (a given noise tensor goes unused, as k's * 0)
    if levels.per_sample:
        B = levels.dev.shape[1]
        table = np.zeros((B, len(rows), len(keys)))
        for k, r in enumerate(rows):
            for j, name in enumerate(keys):
                table[:, k, j] = r.get(name, 0.0)
        nt = None
        if noise_coeffs is not None:
            nt = np.zeros((B, len(rows)))
            for k, c in enumerate(noise_coeffs):
                nt[:, k] = c
        # checked here: linear_step checks host tables only, and these reach it on the device
        if not (np.isfinite(table).all() and (nt is None or np.isfinite(nt).all())):
            raise ValueError("the step's coefficients are not finite (check sigmas)")
        dev = tensors["x"].device
        coeffs = _to_device(torch.from_numpy(table), dev)
        noise_coeffs = None if nt is None else _to_device(torch.from_numpy(nt), dev)
    else:
        coeffs = [[float(r.get(name, 0.0)) for name in keys] for r in rows]
        if noise_coeffs is not None:
            noise_coeffs = [float(c) for c in noise_coeffs]
    kw = {}
    if noise_coeffs is not None:
        kw = {"noise": noise} if noise is not None else {"seeds": seeds, "step": step} if seeds is not None else \
            {"generator": generator}
    return linear_step([tensors[k] for k in keys], coeffs, noise_coeffs=noise_coeffs, **kw)


def _level(levels, value, model: bool):
    """A host level (a float, or the (B,) row) as a device tensor without a host sync:
    for the model (``sigma * s_in``: (B,), x's dtype) or for noise_sampler (0-d, sigmas'
    dtype). Shared: a fill; per-sample: a small queued host-to-device copy."""
    if levels.per_sample:
        return _to_device(torch.as_tensor(np.asarray(value), dtype=levels.dev.dtype), levels.dev.device)
    if model:
        return torch.full_like(levels.s_in, float(value))
    return torch.full((), float(value), dtype=levels.dev.dtype, device=levels.dev.device)


def _noise_at(noise_sampler, a, b):
    return noise_sampler(a, b) if noise_sampler is not None else None


def _euler_rows(den, sigma, sigma_to):
    """k's ``x + to_d(x, sigma, denoised) * (sigma_to - sigma)`` as one combination."""
    c = (sigma_to - sigma) / sigma
    return _lc((1 + c, _X), (-c, den))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, generator=None, seeds=None):
    """A sampler inspired by DPM-Solver-2 and Algorithm 2 from Karras et al. (2022): the
    midpoint in log sigma, two model calls a step (one on the last, an Euler step to 0)."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator)
    fuse = callback is None
    for i in _trange(len(levels) - 1, disable):
        gamma = _churn_gamma(levels, i, s_churn, s_tmin, s_tmax)
        if gamma > 0:
            x = _add_churn(x, levels, i, gamma, s_noise, generator, seeds)
        m, pt = _denoise(model, x, levels.model(i, gamma + 1), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i) * (gamma + 1),
                      'denoised': m})
        x = levels.promote(x)
        sigma_hat, sigma_next = _hs(levels, i) * (gamma + 1), _hs(levels, i + 1)
        den, t = _den(pt, sigma_hat, "x", "m"), {"x": x, "m": m}
        if levels.zero(i + 1):  # Euler method
            x, = _combine(levels, t, [_euler_rows(den, sigma_hat, sigma_next)])
            continue
        sigma_mid = np.exp(np.log(sigma_hat) + 0.5 * (np.log(sigma_next) - np.log(sigma_hat)))
        t["x2"], = _combine(levels, t, [_euler_rows(den, sigma_hat, sigma_mid)])
        t["m2"], pt2 = _denoise(model, t["x2"], _level(levels, sigma_mid, True), extra_args, fuse)
        c = (sigma_next - sigma_hat) / sigma_mid  # x + to_d(x_2, sigma_mid, denoised_2) * dt_2
        x, = _combine(levels, t, [_lc((1.0, _X), (c, {"x2": 1.0}), (-c, _den(pt2, sigma_mid, "x2", "m2")))])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, generator=None, seeds=None):
    """Ancestral sampling with DPM-Solver second-order steps. Noise: ``noise_sampler`` where
    k-diffusion calls it (after the second model call), else in-kernel from ``generator``
    or keyed by ``(seeds[b], step=i)``."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    fuse = callback is None
    for i in _trange(len(levels) - 1, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        sigma, sigma_next = _hs(levels, i), _hs(levels, i + 1)
        sigma_down, sigma_up = _anc_host(sigma, sigma_next, eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        x = levels.promote(x)
        den, t = _den(pt, sigma, "x", "m"), {"x": x, "m": m}
        if _all_or_none(sigma_down == 0, f"sigma_down == 0 (row {i + 1})"):  # Euler method, no noise
            x, = _combine(levels, t, [_euler_rows(den, sigma, sigma_down)])
            continue
        sigma_mid = np.exp(np.log(sigma) + 0.5 * (np.log(sigma_down) - np.log(sigma)))
        t["x2"], = _combine(levels, t, [_euler_rows(den, sigma, sigma_mid)])
        t["m2"], pt2 = _denoise(model, t["x2"], _level(levels, sigma_mid, True), extra_args, fuse)
        c = (sigma_down - sigma) / sigma_mid
        noise = _noise_at(noise_sampler, levels.scalar(i), levels.scalar(i + 1))
        x, = _combine(levels, t, [_lc((1.0, _X), (c, {"x2": 1.0}), (-c, _den(pt2, sigma_mid, "x2", "m2")))],
                      [s_noise * sigma_up], noise, generator, seeds, i)
    return x


def _lms_coeffs(sig, order):
    """k-diffusion's linear_multistep_coeff for every step, once per call: row i holds
    ``integral_{s_i}^{s_{i+1}} prod_{k != j} (tau - s_{i-k}) / (s_{i-j} - s_{i-k}) dtau``
    for j < min(i + 1, order). The integrand is a polynomial of degree < order, so
    ``order``-node Gauss-Legendre is exact (k-diffusion's scipy ``quad`` agrees to its
    rounding); float64, elementwise over the columns of a per-sample ``sig``."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    nodes = nodes.reshape((-1,) + (1,) * (sig.ndim - 1))
    weights = weights.reshape(nodes.shape)
    table = []
    for i in range(sig.shape[0] - 1):
        p = min(i + 1, order)
        half = (sig[i + 1] - sig[i]) / 2
        tau = half * nodes + (sig[i] + sig[i + 1]) / 2
        row = []
        for j in range(p):
            prod = np.ones_like(tau)
            for k in range(p):
                if k != j:
                    prod = prod * (tau - sig[i - k]) / (sig[i - j] - sig[i - k])
            row.append(half * (weights * prod).sum(axis=0))
        table.append(row)
    return table


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (k-diffusion's LMS): ``x + sum_j c_ij d_{i-j}``, d = to_d(x,
    sigma, denoised), the last ``order`` derivatives kept. The coefficients are computed
    once per call on the host. Each step is one linear_step writing x and this step's
    derivative (the history the next steps read); ``order`` is at most 5 (x, the model
    output and 4 past derivatives fill linear_step's 6 inputs)."""
    if not 1 <= order <= 5:
        raise ValueError(f"order must be in 1..5, got {order}")
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    table = _lms_coeffs(levels.host.numpy(), order)
    fuse = callback is None
    n = len(levels) - 1
    ds = []  # past derivatives, newest first
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        x = levels.promote(x)
        sigma = _hs(levels, i)
        d = _lc((1 / sigma, _X), (-1 / sigma, _den(pt, sigma, "x", "m")))
        coeffs = table[i]
        t = {"x": x, "m": m, **{f"d{j}": ds[j - 1] for j in range(1, len(coeffs))}}
        update = _lc((1.0, _X), (coeffs[0], d), *((coeffs[j], {f"d{j}": 1.0}) for j in range(1, len(coeffs))))
        keep = order > 1 and i < n - 1
        out = _combine(levels, t, [update, d] if keep else [update])
        x = out[0]
        if keep:
            ds = [out[1]] + ds[:order - 2]
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, generator=None, seeds=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps. Noise: ``noise_sampler``
    where k-diffusion calls it (after the step, where sigmas[i + 1] > 0), else in-kernel
    from ``generator`` or keyed by ``(seeds[b], step=i)``."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    fuse = callback is None
    for i in _trange(len(levels) - 1, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        sigma, sigma_next = _hs(levels, i), _hs(levels, i + 1)
        sigma_down, sigma_up = _anc_host(sigma, sigma_next, eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        den, t = _den(pt, sigma, "x", "m"), {"x": x, "m": m}
        if _all_or_none(sigma_down == 0, f"sigma_down == 0 (row {i + 1})"):  # Euler method
            t["x"] = levels.promote(x)
            update = _euler_rows(den, sigma, sigma_down)
        else:  # DPM-Solver++(2S), the midpoint in log sigma
            h = np.log(sigma) - np.log(sigma_down)
            sigma_s = np.exp(np.log(sigma) - 0.5 * h)
            t["x2"], = _combine(levels, t, [_lc((sigma_s / sigma, _X), (-np.expm1(-0.5 * h), den))])
            t["m2"], pt2 = _denoise(model, t["x2"], _level(levels, sigma_s, True), extra_args, fuse)
            update = _lc((sigma_down / sigma, _X), (-np.expm1(-h), _den(pt2, sigma_s, "x2", "m2")))
        noisy = not levels.zero(i + 1)
        noise = _noise_at(noise_sampler, levels.scalar(i), levels.scalar(i + 1)) if noisy else None
        x, = _combine(levels, t, [update], [s_noise * sigma_up] if noisy else None, noise, generator, seeds, i)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, generator=None, seeds=None):
    """DPM-Solver++ (stochastic): two model calls a step (one on the last, an Euler step to
    0), each stage one linear_step with its noise.

    Noise: k-diffusion's default is a BrownianTreeNoiseSampler over [min sigma > 0, max
    sigma] (torchsde). Here a given ``noise_sampler`` is called where k-diffusion calls it
    (before the second model call and at the end of the step, even at eta = 0), with
    ``sigmas[i]`` / ``sigmas[i + 1]`` for k's ``sigma_fn(t)`` / ``sigma_fn(t_next)`` (equal
    up to one rounding) and the stage level ``sigma_fn(s)``; without one, the noise is
    drawn in-kernel from ``generator``, or keyed by ``(seeds[b], step=2 i)`` for the first
    stage and ``step=2 i + 1`` for the second (two independent draws per step). Either
    way not a Brownian tree: the two draws of a step are independent, as with
    ``default_noise_sampler``."""
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    fuse = callback is None
    fac = 1 / (2 * r)
    for i in _trange(len(levels) - 1, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        sigma, sigma_next = _hs(levels, i), _hs(levels, i + 1)
        den, t = _den(pt, sigma, "x", "m"), {"x": x, "m": m}
        if levels.zero(i + 1):  # Euler method
            t["x"] = levels.promote(x)
            x, = _combine(levels, t, [_euler_rows(den, sigma, sigma_next)])
            continue
        lt, lt_next = -np.log(sigma), -np.log(sigma_next)  # k's t = -log sigma
        sigma_t, sigma_s = np.exp(-lt), np.exp(-(lt + (lt_next - lt) * r))
        # Step 1 (an ancestral step to sigma_s)
        sd, su = _anc_host(sigma_t, sigma_s, eta)
        with np.errstate(divide="ignore"):  # sigma_down = 0 (eta large): log 0 = -inf, as in k
            s_ = -np.log(sd)
        noise = _noise_at(noise_sampler, levels.scalar(i), _level(levels, sigma_s, False))
        t["x2"], = _combine(levels, t, [_lc((np.exp(-s_) / sigma_t, _X), (-np.expm1(lt - s_), den))],
                            [su * s_noise], noise, generator, seeds, 2 * i)
        t["m2"], pt2 = _denoise(model, t["x2"], _level(levels, sigma_s, True), extra_args, fuse)
        # Step 2 (an ancestral step to sigma_next on the blended denoised sample)
        sd, su = _anc_host(sigma_t, np.exp(-lt_next), eta)
        with np.errstate(divide="ignore"):
            t_next_ = -np.log(sd)
        den_d = _lc((1 - fac, den), (fac, _den(pt2, sigma_s, "x2", "m2")))
        noise = _noise_at(noise_sampler, levels.scalar(i), levels.scalar(i + 1))
        x, = _combine(levels, t, [_lc((np.exp(-t_next_) / sigma_t, _X), (-np.expm1(lt - t_next_), den_d))],
                      [su * s_noise], noise, generator, seeds, 2 * i + 1)
    return x


_SDE_NOISE_DOC = """
    Noise: k-diffusion's default is a BrownianTreeNoiseSampler over [min sigma > 0, max
    sigma] (torchsde). Here a given ``noise_sampler`` is called where k-diffusion calls it
    (every step but the last, when eta != 0); without one the noise is drawn in-kernel
    from ``generator``, or keyed by ``(seeds[b], step=i)`` (batch-size invariant). The
    branches read the host copy of ``sigmas``: no ``if sigmas[i + 1] == 0`` sync per step.
    With an :class:`EpsDenoiser` / :class:`VDenoiser` (and no callback) the step's
    denoised sample is the call's second output, kept as history."""


def _keep(pt, m, out):
    """The denoised sample the next steps read: the model output itself, or the
    history row of the fused call."""
    return m if pt == "sample" else out[1]


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', *, generator=None, seeds=None):
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError('solver_type must be \'heun\' or \'midpoint\'')
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    fuse = callback is None
    n = len(levels) - 1
    old_denoised, h_last = None, None
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        sigma, sigma_next = _hs(levels, i), _hs(levels, i + 1)
        den, t = _den(pt, sigma, "x", "m"), {"x": x, "m": m}
        rows_after = [den] if pt != "sample" and i < n - 1 else []
        if levels.zero(i + 1):  # denoising step: x = denoised
            out = _combine(levels, t, [den] + rows_after)
        else:
            h = np.log(sigma) - np.log(sigma_next)  # k: -log sigma_next - (-log sigma)
            eta_h = eta * h
            a = -np.expm1(-h - eta_h)
            update = _lc((sigma_next / sigma * np.exp(-eta_h), _X), (a, den))
            if old_denoised is not None:
                r = h_last / h
                c = (a / (-h - eta_h) + 1) * (1 / r) if solver_type == 'heun' else 0.5 * a * (1 / r)
                t["old"] = old_denoised
                update = _lc((1.0, update), (c, den), (-c, {"old": 1.0}))
            noisy = bool(eta)
            noise = _noise_at(noise_sampler, levels.scalar(i), levels.scalar(i + 1)) if noisy else None
            nc = [sigma_next * np.sqrt(-np.expm1(-2 * eta_h)) * s_noise] + [0.0] * len(rows_after) if noisy else None
            out = _combine(levels, t, [update] + rows_after, nc, noise, generator, seeds, i)
            h_last = h
        x = out[0]
        old_denoised = _keep(pt, m, out) if i < n - 1 else None
    return x


sample_dpmpp_2m_sde.__doc__ = "DPM-Solver++(2M) SDE (solver_type 'midpoint' or 'heun'): one linear_step a step.\n" \
    + _SDE_NOISE_DOC


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, generator=None, seeds=None):
    extra_args = {} if extra_args is None else extra_args
    levels = _Levels(sigmas, x)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    fuse = callback is None
    n = len(levels) - 1
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, fuse)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        sigma, sigma_next = _hs(levels, i), _hs(levels, i + 1)
        den, t = _den(pt, sigma, "x", "m"), {"x": x, "m": m}
        rows_after = [den] if pt != "sample" and i < n - 1 else []
        if levels.zero(i + 1):  # denoising step: x = denoised
            out = _combine(levels, t, [den] + rows_after)
        else:
            h = np.log(sigma) - np.log(sigma_next)
            h_eta = h * (eta + 1)
            update = _lc((np.exp(-h_eta), _X), (-np.expm1(-h_eta), den))
            phi_2 = np.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                # phi_2 d1 - phi_3 d2 with k's d1, d2, expanded over denoised, denoised_1, denoised_2
                r0, r1 = h_1 / h, h_2 / h
                phi_3 = phi_2 / h_eta - 0.5
                w = (phi_2 * r0 - phi_3) / (r0 + r1)
                t["d1"], t["d2"] = denoised_1, denoised_2
                update = _lc((1.0, update), ((phi_2 + w) / r0, den),
                             (-(phi_2 + w) / r0 - w / r1, {"d1": 1.0}), (w / r1, {"d2": 1.0}))
            elif h_1 is not None:
                r = h_1 / h
                t["d1"] = denoised_1
                update = _lc((1.0, update), (phi_2 / r, den), (-phi_2 / r, {"d1": 1.0}))
            noisy = bool(eta)
            noise = _noise_at(noise_sampler, levels.scalar(i), levels.scalar(i + 1)) if noisy else None
            nc = [sigma_next * np.sqrt(-np.expm1(-2 * h * eta)) * s_noise] + [0.0] * len(rows_after) if noisy \
                else None
            out = _combine(levels, t, [update] + rows_after, nc, noise, generator, seeds, i)
        x = out[0]
        if i < n - 1:
            denoised_1, denoised_2 = _keep(pt, m, out), denoised_1
        h_1, h_2 = h, h_1
    return x


sample_dpmpp_3m_sde.__doc__ = "DPM-Solver++(3M) SDE: one linear_step a step.\n" + _SDE_NOISE_DOC


# ---- denoiser wrappers (k-diffusion's external.py) ---------------------------------------
def _alphas_cumprod(schedule) -> torch.Tensor:
    if isinstance(schedule, NoiseSchedule):
        ac = schedule.alphas_cumprod
    elif isinstance(schedule, torch.Tensor):
        # as k-diffusion, the table's own floating dtype: float64 alphas_cumprod give float64
        # sigmas, sigma_to_t and get_sigmas
        ac = schedule.detach()
        if not ac.is_floating_point():
            ac = ac.to(torch.float32)
    else:
        raise TypeError(f"schedule must be a diffkern.NoiseSchedule or an alphas_cumprod tensor, "
                        f"got {type(schedule).__name__}")
    if ac.dim() != 1 or ac.numel() < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1): a zero-terminal-SNR schedule has an infinite "
                         "sigma_max, which the sigma-space samplers cannot start from")
    return ac


class DiscreteSchedule(torch.nn.Module):
    """A mapping between continuous noise levels (sigmas) and a list of discrete noise
    levels (k-diffusion's DiscreteSchedule): sigma <-> timestep interpolated in log sigma."""

    prediction_type = "sample"

    def __init__(self, sigmas, quantize):
        super().__init__()
        self.register_buffer('sigmas', sigmas)
        self.register_buffer('log_sigmas', sigmas.log())
        self.quantize = quantize

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def get_sigmas(self, n=None):
        if n is None:
            return append_zero(self.sigmas.flip(0))
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


class EpsDenoiser(DiscreteSchedule):
    """k-diffusion's DiscreteEpsDDPMDenoiser over a diffkern :class:`NoiseSchedule`: turns
    an epsilon model ``model(x, t, **kwargs)`` into a denoiser ``D(x; sigma) = x - sigma
    eps(x / sqrt(sigma^2 + 1), sigma_to_t(sigma))``, t fractional unless ``quantize``."""

    prediction_type = "epsilon"

    def __init__(self, model, schedule, quantize=False):
        ac = _alphas_cumprod(schedule)
        super().__init__(((1 - ac) / ac) ** 0.5, quantize)
        self.inner_model = model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_out, c_in

    def get_eps(self, *args, **kwargs):
        return self.inner_model(*args, **kwargs)

    def model_output(self, input, sigma, **kwargs):
        """The raw epsilon at (input, sigma): the samplers hand it to the fused steps."""
        c_in = append_dims(self.get_scalings(sigma)[1], input.ndim)
        return self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out


class VDenoiser(DiscreteSchedule):
    """k-diffusion's DiscreteVDDPMDenoiser over a diffkern :class:`NoiseSchedule`:
    ``D(x; sigma) = v c_out + x c_skip`` with ``c_skip = 1/(sigma^2+1)``,
    ``c_out = -sigma/sqrt(sigma^2+1)``, v the model's output at ``x / sqrt(sigma^2+1)``."""

    prediction_type = "v_prediction"

    def __init__(self, model, schedule, quantize=False):
        ac = _alphas_cumprod(schedule)
        super().__init__(((1 - ac) / ac) ** 0.5, quantize)
        self.inner_model = model
        self.sigma_data = 1.

    def get_scalings(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = -sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out, c_in

    def get_v(self, *args, **kwargs):
        return self.inner_model(*args, **kwargs)

    def model_output(self, input, sigma, **kwargs):
        """The raw v at (input, sigma): the samplers hand it to the fused steps."""
        c_in = append_dims(self.get_scalings(sigma)[2], input.ndim)
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs)

    def forward(self, input, sigma, **kwargs):
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


# k-diffusion's names for the same wrappers (external.py). k-diffusion's own ``VDenoiser`` is
# a different model (v-diffusion-pytorch's continuous atan time), not this discrete one.
DiscreteEpsDDPMDenoiser = EpsDenoiser
DiscreteVDDPMDenoiser = VDenoiser
