"""The eager sampling loops that benchmarks/sampler_loop_speed.py times diffkern against.

- ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde``: k-diffusion's loops
  (crowsonkb/k-diffusion, ``k_diffusion/sampling.py``, MIT license, Copyright (c) 2022
  Katherine Crowson), statement for statement, with two changes: ``trange`` is ``range``
  (no progress bar to pay for), and ``noise_sampler`` must be given, because k-diffusion's
  default, ``BrownianTreeNoiseSampler``, needs torchsde and costs far more than the step
  (issue 21 asks for a plain ``torch.randn`` sampler in its place: :func:`randn_sampler`).
  ComfyUI's copies of these two loops perform the same tensor operations.
- ``sample_unipc``: ComfyUI's ``sample_unipc`` (``comfy/k_diffusion/sampling.py`` calling
  ``comfy/extra_samplers/uni_pc.py``; ComfyUI is GPL-3, so this is NOT a copy: it is
  written here from the UniPC equations (Zhao et al. 2023, arXiv:2302.04867, the B(h)
  variants bh1/bh2 of its appendix) so that it performs the same tensor operations in
  the same order as ComfyUI's loop: the VE sigmas read as a VP schedule with
  alpha = 1/sqrt(1 + sigma^2), noise prediction recovered from the denoiser and turned
  into x0 by tensor ops, the coefficient matrix built from device scalars and solved
  with ``torch.linalg.solve``, the history differences stacked and contracted with
  ``einsum``, one corrector and one predictor update per step. What ComfyUI spends on its
  model wrappers (model_patcher, CFG) is left out: only the sampler's own work is timed.

Every function takes a k-diffusion denoiser ``model(x, sigma_vector) -> denoised`` and
returns the final x. They run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch


def randn_sampler(x: torch.Tensor):
    """k-diffusion's ``default_noise_sampler``: a fresh ``torch.randn_like(x)`` per call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


# ---- k-diffusion (MIT) ------------------------------------------------------------------------
@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE."""
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError('solver_type must be \'heun\' or \'midpoint\'')
    if noise_sampler is None:
        raise ValueError("give a noise_sampler (k-diffusion's default is a BrownianTreeNoiseSampler)")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    old_denoised = None
    h_last = None
    h = None

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            # Denoising step
            x = denoised
        else:
            # DPM-Solver++(2M) SDE
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h

            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised

            if old_denoised is not None:
                r = h_last / h
                if solver_type == 'heun':
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                elif solver_type == 'midpoint':
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)

            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() \
                    * s_noise

        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE."""
    if noise_sampler is None:
        raise ValueError("give a noise_sampler (k-diffusion's default is a BrownianTreeNoiseSampler)")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            # Denoising step
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)

            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised

            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d

            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * \
                    (-2 * h * eta).expm1().neg().sqrt() * s_noise

        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ---- UniPC, ComfyUI's loop rewritten from the equations (see the module docstring) -----------
def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.dim()))


class _VPOfVE:
    """The VE level sigma read as a VP state: x_vp = x_ve / sqrt(1 + sigma^2), so
    log alpha = -log(1 + sigma^2) / 2, std = sqrt(1 - alpha^2), lambda = log alpha - log std.
    Evaluated with tensor ops on the level tensors, as ComfyUI does."""

    @staticmethod
    def log_alpha(s):
        return 0.5 * torch.log(1 / (s * s + 1))

    def alpha(self, s):
        return torch.exp(self.log_alpha(s))

    def std(self, s):
        return torch.sqrt(1. - torch.exp(2. * self.log_alpha(s)))

    def lam(self, s):
        la = self.log_alpha(s)
        return la - 0.5 * torch.log(1. - torch.exp(2. * la))


class _UniPC:
    def __init__(self, model, variant):
        if variant not in ('bh1', 'bh2'):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
        self.denoiser, self.variant, self.vp = model, variant, _VPOfVE()

    def x0(self, x, s):
        """x0 from the VP state x at level s: the model's noise prediction (recovered from
        the denoiser on the VE input), then (x - std eps) / alpha."""
        sv = _col(s, x.dim())
        x_ve = x * ((sv ** 2 + 1.0) ** 0.5)
        eps = (x_ve - self.denoiser(x_ve, s)) / sv
        return (x - _col(self.vp.std(s), x.dim()) * eps) / _col(self.vp.alpha(s), x.dim())

    def update(self, x, ms, ss, s, order, corrector):
        """UniP to level s from the history (ms: x0 at the levels ss, the last the newest),
        then (corrector) one model call at the predicted x and UniC. -> (x, x0 at s or None)."""
        vp, nd = self.vp, x.dim()
        m0, s0 = ms[-1], ss[-1]
        lam0, lam_s = vp.lam(s0), vp.lam(s)
        h = lam_s - lam0
        alpha_s = torch.exp(vp.log_alpha(s))
        ratios, diffs = [], []
        for k in range(1, order):
            r = ((vp.lam(ss[-(k + 1)]) - lam0) / h)[0]
            ratios.append(r)
            diffs.append((ms[-(k + 1)] - m0) / r)
        ratios.append(1.)
        ratios = torch.tensor(ratios, device=x.device)
        hh = -h[0]  # data prediction: the exponential integrator runs in -lambda
        phi1 = torch.expm1(hh)
        B = hh if self.variant == 'bh1' else torch.expm1(hh)
        # the order conditions: sum_k rho_k r_k^(i-1) = (i-1)! phi_i(hh) / B(h), i = 1..order,
        # phi_i from phi_{i+1}(h) = (phi_i(h) - 1/i!) / h
        phi, fact, rows, rhs = phi1 / hh - 1, 1, [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(ratios, i - 1))
            rhs.append(phi * fact / B)
            fact *= i + 1
            phi = phi / hh - 1 / fact
        R, b = torch.stack(rows), torch.tensor(rhs, device=x.device)
        D = torch.stack(diffs, dim=1) if diffs else None
        predict = D is not None
        if predict:
            rho_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        if corrector:
            rho_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(R, b)
        base = _col(vp.std(s) / vp.std(s0), nd) * x - _col(alpha_s * phi1, nd) * m0
        x_new = base - _col(alpha_s * B, nd) * (torch.einsum('k,bkchw->bchw', rho_p, D) if predict else 0)
        m_new = None
        if corrector:
            m_new = self.x0(x_new, s)
            c_hist = torch.einsum('k,bkchw->bchw', rho_c[:-1], D) if D is not None else 0
            x_new = base - _col(alpha_s * B, nd) * (c_hist + rho_c[-1] * (m_new - m0))
        return x_new, m_new


@torch.no_grad()
def sample_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=False, variant='bh1'):
    """UniPC as ComfyUI's ``sample_unipc`` runs it: multistep, data prediction, order
    min(3, steps - 1) with lower orders at the start and the end, a final sigma of 0
    stepped to 0.001; ``noise`` is x at sigmas[0] (VE). 4-D x (the einsums)."""
    if extra_args:
        raise ValueError("extra_args are not used here")
    levels = sigmas.clone()
    if levels[-1] == 0:
        levels[-1] = 0.001
    solver = _UniPC(model, variant)
    steps = len(levels) - 1
    order = min(3, steps - 1)
    x = noise / torch.sqrt(1.0 + levels[0] ** 2.0)
    batch = x.shape[0]
    for k in range(steps):
        s = levels[k].expand(batch)
        if k == 0:
            ms, ss = [solver.x0(x, s)], [s]
        elif k < order:
            x, m = solver.update(x, ms, ss, s, k, corrector=True)
            ms.append(m)
            ss.append(s)
        else:
            for j in range(k, k + 1 + (k == steps - 1)):  # the last step also takes the step to levels[-1]
                s = levels[j].expand(batch)
                x, m = solver.update(x, ms, ss, s, min(order, steps + 1 - j), corrector=j != steps)
                ms, ss = ms[1:] + ms[-1:], ss[1:] + [s]  # shifted; the newest slot is overwritten below
                if j < steps:
                    ms[-1] = m
        if callback is not None:
            callback({'x': x, 'i': k, 'denoised': ms[-1]})
    return x / _VPOfVE().alpha(levels[-1])
