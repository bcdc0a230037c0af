"""ComfyUI's multistep samplers on diffkern's fused :func:`~diffkern.sampler_ops.linear_step`.

``from diffkern.samplers import sample_deis`` replaces ComfyUI's
``comfy.k_diffusion.sampling.sample_deis`` (likewise ``sample_ipndm``, ``sample_ipndm_v``,
``sample_res_multistep``, ``sample_res_multistep_ancestral``) and
``comfy.extra_samplers.uni_pc.sample_unipc`` / ``sample_unipc_bh2``: same signatures, defaults
and arithmetic (comfyanonymous/ComfyUI ``comfy/k_diffusion/sampling.py``, ``deis.py`` and
``comfy/extra_samplers/uni_pc.py``), conventions of :mod:`diffkern.k_samplers`:
``model(x, sigma, **extra_args)`` returns the denoised sample, ``sigma`` being
``sigmas[i] * s_in``.

Each update is one call of ``linear_step`` per model evaluation: the step's coefficients
(the multistep weights, with the ``d = (x - denoised) / sigma`` conversion and UniPC's
small linear solves folded in) are formed in float64 on the host from one host copy of
``sigmas`` made per call, so no step syncs the host. The derivative / x0 history the
next steps need is a further output row of the same call. With diffkern's
:class:`~diffkern.k_samplers.EpsDenoiser` / :class:`~diffkern.k_samplers.VDenoiser` (and no
``callback``), iPNDM, DEIS and res_multistep take the raw epsilon / v and fold
``D = a x + b m`` into the same coefficients, as the k-diffusion samplers do (UniPC calls
the wrapper).

Differences, all invisible to the results beyond rounding:

- ``sigmas`` must be 1-D (one schedule for the batch).
- ``res_multistep``'s noise: a given ``noise_sampler(sigma, sigma_next)`` is called
  exactly where ComfyUI calls it (also at ``eta=0``, where ComfyUI multiplies it by 0 and
  so does not use it here either). Without one, noise is drawn in-kernel from
  ``generator=`` or keyed by ``seeds=`` (step ``i`` draws with ``step=i``), not from
  ComfyUI's seeded ``torch.randn``; nothing is drawn where the noise coefficient is 0.
  ComfyUI's model-sampling ``noise_scale`` factor (a ComfyUI model attribute) is 1.
- DEIS's coefficient table: ComfyUI integrates it in float32 (``torch.linspace``'s default
  dtype); here in float64, so the two agree to float32 rounding (~1e-6 relative). The
  EDM-to-VP fit constants are rounded where ComfyUI rounds them (one of its logs is float32).
- Callbacks get the current ``x`` (ComfyUI's iPNDM/DEIS pass the initial ``x`` on every
  step); UniPC's callback gets ComfyUI's VP-scaled ``x``.
- ``max_order=1`` works (Euler); ComfyUI's iPNDM/DEIS raise IndexError there.
- UniPC does not overwrite the caller's final ``sigmas[-1] == 0`` with 0.001 (ComfyUI
  writes into the given tensor); it steps to 0.001 as ComfyUI does.
"""

from __future__ import annotations

import math

import torch

from . import _validate as V
from .k_samplers import _denoise, _keyed_check, _Levels, _trange, get_ancestral_step
from .sampler_ops import linear_step

__all__ = ["sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep",
           "sample_res_multistep_ancestral", "sample_unipc", "sample_unipc_bh2"]


def _levels_1d(sigmas, x, name):
    levels = _Levels(sigmas, x)
    if levels.per_sample:
        raise ValueError(f"{name} takes 1-D sigmas (one schedule for the batch), got shape "
                         f"{tuple(levels.dev.shape)}")
    return levels


def _combine(inputs, rows, noise_coeff=0.0, noise=None, generator=None, seeds=None, step=None):
    """One linear_step: ``rows`` of float64 coefficients over ``inputs`` (x first). Inputs
    other than x whose coefficients are zero in every row are dropped (not read)."""
    keep = [0] + [j for j in range(1, len(inputs)) if any(r[j] != 0.0 for r in rows)]
    ins = [inputs[j] for j in keep]
    coeffs = [[float(r[j]) for j in keep] for r in rows]
    if noise_coeff == 0.0:
        return linear_step(ins, coeffs)
    nc = [float(noise_coeff)] + [0.0] * (len(rows) - 1)
    if noise is not None:
        return linear_step(ins, coeffs, noise_coeffs=nc, noise=noise)
    if seeds is not None:
        return linear_step(ins, coeffs, noise_coeffs=nc, generator=generator, seeds=seeds, step=step)
    return linear_step(ins, coeffs, noise_coeffs=nc, generator=generator)


def _den_affine(pt, s):
    """(a, b) with the denoised sample D = a x + b m for a model output m of prediction type
    ``pt`` at sigma s (the VE forms of k-diffusion's wrappers; sigma_data 1)."""
    if pt == "sample":
        return 0.0, 1.0
    if pt == "epsilon":
        return 1.0, -s
    return 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)  # v_prediction


def _fold(rows, a, b):
    """Rows over [x, D, ...] as rows over [x, m, ...], D = a x + b m."""
    return [[r[0] + r[1] * a if a else r[0], r[1] * b] + list(r[2:]) for r in rows]


def _d_step(x, m, ab, buf, s, weights, need_d):
    """x + sum_k weights[k] d_k with d_0 = (x - D) / s folded into x's and the model
    output's coefficients (D = a x + b m, ``ab``) and d_k = buf[-k]; with ``need_d`` d_0 is
    a second output row (the history). Returns (x_next, d_0 or None)."""
    w0 = weights[0]
    rows = [[1.0 + w0 / s, -w0 / s] + [weights[k] for k in range(1, len(weights))]]
    if need_d:
        rows.append([1.0 / s, -1.0 / s] + [0.0] * (len(weights) - 1))
    out = _combine([x, m] + [buf[-k] for k in range(1, len(weights))], _fold(rows, *ab))
    return out[0], (out[1] if need_d else None)


def _check_order(max_order, top):
    if not isinstance(max_order, int) or not 1 <= max_order <= top:
        raise ValueError(f"max_order must be an int in [1, {top}], got {max_order!r}")


def _push(buf, d, max_order):
    if d is not None:
        buf.append(d)
        del buf[:-(max_order - 1)]


# ---- iPNDM ---------------------------------------------------------------------------------
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_weights(sig, i, order):
    """iPNDM's Adams-Bashforth weights on d_i, d_{i-1}, ... (fixed steps)."""
    return _AB[order]


def _ipndm_v_weights(sig, i, order):
    """iPNDM-v's variable-step weights, ComfyUI's (zju-pi diff-solvers) expressions."""
    t = sig
    h_n = t[i + 1] - t[i]
    if order == 1:
        return (1.0,)
    h_n_1 = t[i] - t[i - 1]
    if order == 2:
        return ((2 + (h_n / h_n_1)) / 2, -(h_n / h_n_1) / 2)
    h_n_2 = t[i - 1] - t[i - 2]
    if order == 3:
        temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
        return ((2 + (h_n / h_n_1)) / 2 + temp,
                -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp,
                temp * h_n_1 / h_n_2)
    h_n_3 = t[i - 2] - t[i - 3]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2
             + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    r = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return ((2 + (h_n / h_n_1)) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + r) * temp2,
            temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + r * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * r * h_n_1 / h_n_2)


def _ipndm_loop(name, weights_fn, model, x, sigmas, extra_args, callback, disable, max_order):
    extra_args = {} if extra_args is None else extra_args
    _check_order(max_order, 4)
    levels = _levels_1d(sigmas, x, name)
    sig = [float(s) for s in levels.host]
    n = len(sig) - 1
    buf = []  # the last max_order - 1 derivatives d, newest last
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, callback is None)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        s, s_next = sig[i], sig[i + 1]
        need_d = max_order > 1 and i < n - 1  # d_i is read by a later step
        order = min(max_order, i + 1)
        if s_next == 0:  # denoising step: x' = D
            if not need_d and pt == "sample":
                x = m
                continue
            weights = (-s,)  # x - s d = D
        else:
            weights = tuple((s_next - s) * w for w in weights_fn(sig, i, order))
        x, d = _d_step(x, m, _den_affine(pt, s), buf, s, weights, need_d)
        _push(buf, d, max_order)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth in sigma on ``d = (x - D) / sigma`` with
    up to ``max_order - 1`` past derivatives; ``x' = D`` where ``sigma_next == 0``. One
    model evaluation and one fused pass per step."""
    return _ipndm_loop("sample_ipndm", _ipndm_weights, model, x, sigmas, extra_args, callback, disable, max_order)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable-step Adams-Bashforth weights (from the sigma spacing)."""
    return _ipndm_loop("sample_ipndm_v", _ipndm_v_weights, model, x, sigmas, extra_args, callback, disable,
                       max_order)


# ---- DEIS ------------------------------------------------------------------------------------
def _deis_vp_fit():
    """(beta_min, beta_d, beta_1 = beta_d + beta_min) of ComfyUI's EDM->VP fit (deis.edm2t: sigma in [0.002, 80], eps_s
    1e-3), rounded where ComfyUI rounds: its ``np.log(torch.tensor(0.002) ** 2 + 1)`` and
    the division by eps_s are float32, the rest (``torch.tensor(80)`` is an int64) float64."""
    import numpy as np

    eps_s = 1e-3
    log_min_over_eps = float((torch.as_tensor(np.log((torch.tensor(0.002) ** 2 + 1).numpy())) / eps_s).float())
    log_max = float(np.log(np.int64(80) ** 2 + 1))
    beta_d = 2 * (log_min_over_eps - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    return beta_min, beta_d, beta_d + beta_min


def _deis_tab(sig, max_order, N=10000):
    """ComfyUI's DEIS 'tab' coefficients C[i] (for the steps that use them: order >= 2 and
    sigma_{i+1} > 0), in float64 on the host: sum over N points tau of linspace(t_i,
    t_{i+1}) of -0.5 dlog(alpha)/dtau / sqrt(alpha (1 - alpha)) * L_j(tau) * dt / N, L_j
    the Lagrange basis on t_i, t_{i-1}, ..., t the VP time of each sigma."""
    import numpy as np  # single-threaded: these 10^4-point sums are host bookkeeping

    b0, bd, b1 = _deis_vp_fit()
    db = b1 - b0
    s = np.asarray(sig, dtype=np.float64)
    t = (np.sqrt(b0 ** 2 + 2 * bd * np.log(s ** 2 + 1)) - b0) / bd
    C = {}
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sig[i + 1] <= 0:
            continue
        taus = np.linspace(t[i], t[i + 1], N)
        dtau = (t[i + 1] - t[i]) / N
        alpha = np.exp(-0.5 * taus ** 2 * db - taus * b0)
        integrand = -0.5 * (-(taus * db) - b0) / np.sqrt(alpha * (1 - alpha))
        prev_t = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
            row.append(float(np.sum(integrand * poly) * dtau))
        C[i] = row
    return C


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode='tab'):
    """DEIS (Zhang & Chen 2023), ComfyUI's 'tab' form: x' = x + sum_j C[i][j] d_{i-j} with
    the exponential-integrator coefficients of the VP ODE tabulated once per call on the
    host; Euler for the first step and wherever sigma_next <= 0."""
    if deis_mode != 'tab':
        raise NotImplementedError(f"deis_mode {deis_mode!r}: only 'tab' (ComfyUI's default; its 'rhoab' table has "
                                  "one coefficient more than its loop unpacks from step max_order on)")
    extra_args = {} if extra_args is None else extra_args
    _check_order(max_order, 4)
    levels = _levels_1d(sigmas, x, "sample_deis")
    sig = [float(s) for s in levels.host]
    n = len(sig) - 1
    coeffs = _deis_tab(sig, max_order)
    buf = []
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, callback is None)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        s, s_next = sig[i], sig[i + 1]
        order = 1 if s_next <= 0 else min(max_order, i + 1)
        weights = (s_next - s,) if order == 1 else tuple(coeffs[i])
        x, d = _d_step(x, m, _den_affine(pt, s), buf, s, weights, max_order > 1 and i < n - 1)
        _push(buf, d, max_order)
    return x


# ---- res_multistep -----------------------------------------------------------------------------
def _f64(v):
    return torch.tensor(v, dtype=torch.float64)


def _res_multistep(name, model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, generator,
                   seeds):
    extra_args = {} if extra_args is None else extra_args
    levels = _levels_1d(sigmas, x, name)
    V.check_generator(generator, x, None)
    _keyed_check(x, seeds, generator, noise_sampler)
    sig = [float(s) for s in levels.host]
    n = len(sig) - 1
    x = levels.promote(x)  # ComfyUI's first (Euler) step promotes x with sigmas' dtype in to_d
    old_denoised, old_sigma_down = None, None
    for i in _trange(n, disable):
        m, pt = _denoise(model, x, levels.model(i), extra_args, callback is None)
        s, s_next = sig[i], sig[i + 1]
        sigma_down, sigma_up = get_ancestral_step(s, s_next, eta=eta)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': levels.scalar(i), 'sigma_hat': levels.scalar(i), 'denoised': m})
        if sigma_down == 0 or old_denoised is None:  # Euler to sigma_down
            c = (sigma_down - s) / s
            row = [1.0 + c, -c, 0.0]
        else:
            # 2nd-order multistep of arXiv:2308.02157 in t = -log sigma; torch's float64 scalars
            # keep ComfyUI's inf/nan behaviour (then nan_to_num) where c2 or h is 0
            t, t_old, t_next, t_prev = (-_f64(v).log() for v in (s, old_sigma_down, sigma_down, sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / (-h)
            phi2 = (phi1 - 1.0) / (-h)
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            row = [float(h.neg().exp()), float(h * b1), float(h * b2)]
        rows = [row]
        keep_den = pt != "sample" and i < n - 1  # D is the next step's history: a second row
        if keep_den:
            rows.append([0.0, 1.0, 0.0])
        inputs = [x, m, old_denoised if old_denoised is not None else m]
        nc, noise = 0.0, None
        if s_next > 0:
            nc = s_noise * sigma_up
            if noise_sampler is not None:
                noise = noise_sampler(levels.scalar(i), levels.scalar(i + 1))  # called as ComfyUI calls it
        rows = _fold(rows, *_den_affine(pt, s))
        if nc == 0.0:
            out = _combine(inputs, rows)
        else:
            out = _combine(inputs, rows, nc, noise, generator if noise is None else None,
                           seeds if noise is None else None, i)
        x = out[0]
        old_denoised, old_sigma_down = (out[1] if keep_den else m), sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                         noise_sampler=None):
    """res_multistep (ComfyUI): the second-order exponential multistep in log sigma
    (arXiv:2308.02157) on the denoised history; Euler for the first step and to 0. A given
    ``noise_sampler`` is called where ComfyUI calls it (it adds it times 0)."""
    return _res_multistep("sample_res_multistep", model, x, sigmas, extra_args, callback, disable, s_noise,
                          noise_sampler, 0., None, None)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                   s_noise=1., noise_sampler=None, *, generator=None, seeds=None):
    """res_multistep with ancestral steps: to sigma_down, then ``s_noise * sigma_up`` times
    noise (in the same fused pass): from ``noise_sampler``, else in-kernel from
    ``generator`` or keyed by ``seeds`` (step i draws with ``step=i``)."""
    return _res_multistep("sample_res_multistep_ancestral", model, x, sigmas, extra_args, callback, disable,
                          s_noise, noise_sampler, eta, generator, seeds)


# ---- UniPC -----------------------------------------------------------------------------------
class _SigmaConvert:
    """ComfyUI's uni_pc.SigmaConvert on host floats: the VP view of a VE sigma, with
    ComfyUI's expressions (``1 - exp(2 log alpha)`` loses digits at small sigma; kept, so the
    coefficients are ComfyUI's to float64 rounding)."""

    @staticmethod
    def log_alpha(s):
        return 0.5 * math.log(1 / ((s * s) + 1))

    def alpha(self, s):
        return math.exp(self.log_alpha(s))

    def std(self, s):
        return math.sqrt(1. - math.exp(2. * self.log_alpha(s)))

    def lam(self, s):
        la = self.log_alpha(s)
        return la - 0.5 * math.log(1. - math.exp(2. * la))


def _unipc_update(ns, T, i, p, variant):
    """The UniPC-bh update of ComfyUI's ``multistep_uni_pc_bh_update`` (predict_x0) from
    T[i-1] to T[i] at order p, in VE form (its VP x divided by alpha): returns (kx, pred,
    corr), the predictor ``kx X_{i-1} + sum_j pred[j] m_j`` and the corrector ``kx X_{i-1} +
    sum_j corr[j] m_j`` (j = i in corr: the model output at the predicted point), m_j the
    x0 prediction at T[j]. The small solves run on the host in float64."""
    lam_p0, lam_t = ns.lam(T[i - 1]), ns.lam(T[i])
    h = lam_t - lam_p0
    kx = ns.std(T[i]) / ns.std(T[i - 1]) * ns.alpha(T[i - 1]) / ns.alpha(T[i])
    rks = [(ns.lam(T[i - 1 - k]) - lam_p0) / h for k in range(1, p)] + [1.]
    rks_t = torch.tensor(rks, dtype=torch.float64)
    hh = torch.tensor(-h, dtype=torch.float64)
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    if variant == 'bh1':
        B_h = hh
    elif variant == 'bh2':
        B_h = torch.expm1(hh)
    else:
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    R, b = [], []
    for j in range(1, p + 1):
        R.append(torch.pow(rks_t, j - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= (j + 1)
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R = torch.stack(R)
    b = torch.stack(b)
    rhos_p = [0.5] if p == 2 else (torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist() if p > 2 else [])
    rhos_c = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
    B, phi = float(B_h), float(h_phi_1)
    pred, corr = {i - 1: -phi}, {i - 1: -phi}
    for k in range(1, p):
        if rhos_p:
            pred[i - 1 - k] = -B * rhos_p[k - 1] / rks[k - 1]
            pred[i - 1] += B * rhos_p[k - 1] / rks[k - 1]
        corr[i - 1 - k] = -B * rhos_c[k - 1] / rks[k - 1]
        corr[i - 1] += B * rhos_c[k - 1] / rks[k - 1]
    corr[i] = -B * rhos_c[-1]
    corr[i - 1] += B * rhos_c[-1]
    return kx, pred, corr


@torch.no_grad()
def sample_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=False, noise_scale=1.0,
                 variant='bh1'):
    """UniPC (Zhao et al. 2023) as ComfyUI runs it: multistep UniP predictor + UniC
    corrector, data prediction, order ``min(3, steps - 1)`` with lower orders at the start
    and the end, on the VP view of the VE sigmas (``alpha = 1/sqrt(1 + sigma^2)``); a final
    sigma of 0 is stepped to 0.001, and the result is that state (VE scale). ``noise`` is
    the VE start (``x`` at ``sigmas[0]``). One model evaluation per step; after each, one
    fused pass writes the corrected x and the next predicted x (from the last corrected x
    and the x0 history), the corrector's and the next predictor's coefficients solved on
    the host in float64."""
    if noise_scale != 1.0:
        raise NotImplementedError("noise_scale != 1 is not implemented (the ComfyUI version mirrored here has "
                                  "no noise_scale)")
    if variant not in ('bh1', 'bh2'):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    levels = _levels_1d(sigmas, noise, "sample_unipc")
    T = [float(s) for s in levels.host]
    if T[-1] == 0:
        T[-1] = 0.001
    n = len(T) - 1
    ns = _SigmaConvert()
    X = noise
    if n < 1:
        return X
    order = min(3, n - 1)

    def step_order(i):  # the order of the update to T[i] (lower_order_final)
        return i if i < order else min(order, n + 1 - i)

    updates = {}

    def update(i):  # (kx, pred, corr) of the update to T[i]: its predictor and its corrector run in two calls
        if i not in updates:
            updates[i] = _unipc_update(ns, T, i, step_order(i), variant)
        return updates[i]

    ms = []  # the x0 history m_0, m_1, ... (None once no step reads it)
    X_last = X_pred = X
    for i in _trange(n, disable):
        ms.append(model(X_pred, levels.model(i), **extra_args))
        if i == 0:
            if n == 1:  # ComfyUI's loop evaluates the model and takes no step; it returns x / alpha(T[1])
                (X_pred,) = _combine([X], [[1 / math.sqrt(1.0 + T[0] ** 2.0) / ns.alpha(T[1])]])
            else:
                kx, pred, _ = update(1)
                (X_pred,) = _combine([X, ms[0]], [[kx, pred[0]]])
            x_cb, t_cb = X, T[0]
        else:
            # corrector to T[i] (the model output at the predicted point is ms[i]), then the
            # predictor to T[i + 1] from the corrected x, substituted: both rows from X_last
            kc, _, corr = update(i)
            kp, pred, _ = update(i + 1)
            js = sorted(set(corr) | set(pred), reverse=True)  # i, i - 1, ...
            row_c = [kc] + [corr.get(j, 0.0) for j in js]
            row_p = [kp * kc] + [kp * corr.get(j, 0.0) + pred.get(j, 0.0) for j in js]
            inputs = [X_last] + [ms[j] for j in js]
            if i == n - 1 and callback is None:
                (X_pred,) = _combine(inputs, [row_p])
            else:
                X_last, X_pred = _combine(inputs, [row_c, row_p])
            x_cb, t_cb = (X_pred, T[n]) if i == n - 1 else (X_last, T[i])
            if i >= 3:
                ms[i - 3] = None
        if callback is not None:  # ComfyUI's callback sees its VP x
            callback({'x': x_cb * ns.alpha(t_cb), 'i': i, 'denoised': ms[i]})
    return X_pred


@torch.no_grad()
def sample_unipc_bh2(model, noise, sigmas, extra_args=None, callback=None, disable=False):
    """:func:`sample_unipc` with ``variant='bh2'`` (B(h) = e^h - 1)."""
    return sample_unipc(model, noise, sigmas, extra_args, callback, disable, variant='bh2')
