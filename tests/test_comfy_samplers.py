"""diffkern.samplers' ComfyUI samplers (comfy_samplers.py): each equals a float64 run of
ComfyUI's own loop, transcribed below statement by statement from comfyanonymous/ComfyUI
``comfy/k_diffusion/sampling.py``, ``comfy/k_diffusion/deis.py`` and
``comfy/extra_samplers/uni_pc.py`` (ComfyUI is not installed; only ``trange`` -> ``range``
and ComfyUI's model plumbing are left out), on a nonlinear toy denoiser with Karras sigmas:
1e-12 in float64, 1e-5 in float32 (a non-contiguous x); one model evaluation and one
fused linear_step per step."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import gen, max_rel_err

import diffkern as dk
from diffkern import _rng
from diffkern import comfy_samplers as C
from diffkern import samplers as S

F64 = torch.float64
SHAPE = (3, 5, 7, 3)  # (B, C, H, W): ComfyUI's UniPC einsums want 4-D x
S0 = 0.8


def denoiser(x, sigma):
    """A smooth nonlinear denoiser: the Gaussian posterior mean plus a sigma-dependent tanh
    term (so every step's model output depends on the history nonlinearly)."""
    s = sigma.to(F64).reshape(-1, *([1] * (x.dim() - 1)))
    x64 = x.to(F64)
    return (x64 * S0**2 / (S0**2 + s**2) + 0.3 * s / (1 + s**2) * torch.tanh(x64)).to(x.dtype)


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    """Karras levels computed in float32 (so float32 and float64 runs see the same values)."""
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def x_start(sigmas, seed=0):
    return torch.randn(*SHAPE, generator=gen(seed), dtype=F64) * float(sigmas[0])


class Counting:
    def __init__(self, fn=denoiser):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def noncontig(x):
    return x.transpose(1, 3).contiguous().transpose(1, 3)


# ---- ComfyUI's loops, float64, as written there ---------------------------------------------------
def trange(n, disable=None):
    return range(n)


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def comfy_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    buffer_model = []
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer_model[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer_model[-1] + 5 * buffer_model[-2]) / 12
        elif order == 4:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer_model[-1] + 37 * buffer_model[-2]
                                                 - 9 * buffer_model[-3]) / 24
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur
        else:
            buffer_model.append(d_cur)
    return x_next


def comfy_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    t_steps = sigmas
    buffer_model = []
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
        elif order == 3:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1]
                                                 + coeff3 * buffer_model[-2])
        elif order == 4:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            h_n_3 = (t_steps[i - 2] - t_steps[i - 3])
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2
                     + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
                * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 \
                - (1 + (h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))
                                              * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1]
                                                 + coeff3 * buffer_model[-2] + coeff4 * buffer_model[-3])
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


# ComfyUI's deis.py ('tab'): the only change is taus = linspace(..., dtype=float64) (ComfyUI's
# linspace takes the default float32 even for float64 sigmas), so this is its float64 form.
def edm2t(edm_steps, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80):
    vp_sigma_inv = lambda beta_d, beta_min: lambda sigma: (  # noqa: E731
        ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d)
    with warnings.catch_warnings():  # numpy's __array_wrap__ deprecation, on ComfyUI's np.log(tensor)
        warnings.simplefilter("ignore", DeprecationWarning)
        vp_beta_d = 2 * (np.log(torch.tensor(sigma_min).cpu() ** 2 + 1) / epsilon_s
                         - np.log(torch.tensor(sigma_max).cpu() ** 2 + 1)) / (epsilon_s - 1)
        vp_beta_min = np.log(torch.tensor(sigma_max).cpu() ** 2 + 1) - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(vp_beta_d.clone().detach().cpu(), vp_beta_min.clone().detach().cpu())(
        edm_steps.clone().detach().cpu())
    return t_steps, vp_beta_min, vp_beta_d + vp_beta_min


def cal_poly(prev_t, j, taus):
    poly = 1
    for k in range(prev_t.shape[0]):
        if k == j:
            continue
        poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
    return poly


def t2alpha_fn(beta_0, beta_1, t):
    return torch.exp(-0.5 * t ** 2 * (beta_1 - beta_0) - t * beta_0)


def cal_intergrand(beta_0, beta_1, taus):
    with torch.inference_mode(mode=False):
        taus = taus.clone()
        beta_0 = beta_0.clone()
        beta_1 = beta_1.clone()
        with torch.enable_grad():
            taus.requires_grad_(True)
            alpha = t2alpha_fn(beta_0, beta_1, taus)
            log_alpha = alpha.log()
            log_alpha.sum().backward()
            d_log_alpha_dtau = taus.grad
    integrand = -0.5 * d_log_alpha_dtau / torch.sqrt(alpha * (1 - alpha))
    return integrand


def get_deis_coeff_list(t_steps, max_order, N=10000):
    t_steps, beta_0, beta_1 = edm2t(t_steps)
    C = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
        else:
            taus = torch.linspace(t_cur, t_next, N, dtype=F64)
            dtau = (t_next - t_cur) / N
            prev_t = t_steps[[i - k for k in range(order)]]
            coeff_temp = []
            integrand = cal_intergrand(beta_0, beta_1, taus)
            for j in range(order):
                poly = cal_poly(prev_t, j, taus)
                coeff_temp.append(torch.sum(integrand * poly) * dtau)
            C.append(coeff_temp)
    return C


def comfy_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode='tab'):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    t_steps = sigmas
    coeff_list = get_deis_coeff_list(t_steps, max_order)
    buffer_model = []
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        elif order == 3:
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2]
        elif order == 4:
            coeff_cur, coeff_prev1, coeff_prev2, coeff_prev3 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2] \
                + coeff_prev3 * buffer_model[-3]
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def comfy_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                        noise_sampler=None, eta=1., cfg_pp=False):
    """ComfyUI's res_multistep without cfg_pp (its model-patcher plumbing) and with its
    model-sampling noise_scale = 1."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = denoised
        old_sigma_down = sigma_down
    return x


def comfy_res_multistep_eta0(model, x, sigmas, s_noise=1., noise_sampler=None):
    return comfy_res_multistep(model, x, sigmas, s_noise=s_noise, noise_sampler=noise_sampler, eta=0.)


def level_noise(calls=None):
    """noise_sampler(sigma, sigma_next): a pure function of the level (so both loops see the
    same z), in sigma's dtype (so a float32 run stays float32); logs its calls."""
    def sample(sigma, sigma_next):
        if calls is not None:
            calls.append((float(sigma), float(sigma_next)))
        z = torch.randn(*SHAPE, generator=gen(int(float(sigma) * 1e6) % 2**31), dtype=F64)
        return z.to(sigma.dtype)
    return sample


# ComfyUI's uni_pc.py, the parts sample_unipc runs: SigmaConvert, predict_eps_sigma,
# model_wrapper (model_type "noise", guidance "uncond"), UniPC (bh variants, predict_x0, no
# thresholding, multistep sample) and sample_unipc.
def expand_dims(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


class SigmaConvert:
    schedule = ""

    def marginal_log_mean_coeff(self, sigma):
        return 0.5 * torch.log(1 / ((sigma * sigma) + 1))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std


def predict_eps_sigma(model, input, sigma_in, **kwargs):
    sigma = sigma_in.view(sigma_in.shape[:1] + (1,) * (input.ndim - 1))
    input = input * ((sigma ** 2 + 1.0) ** 0.5)
    return (input - model(input, sigma_in, **kwargs)) / sigma


def model_wrapper(model, noise_schedule, model_type="noise", model_kwargs={}, guidance_type="uncond"):  # noqa: B006
    def get_model_input_time(t_continuous):
        if noise_schedule.schedule == 'discrete':
            return (t_continuous - 1. / noise_schedule.total_N) * 1000.
        else:
            return t_continuous

    def noise_pred_fn(x, t_continuous, cond=None):
        if t_continuous.reshape((-1,)).shape[0] == 1:
            t_continuous = t_continuous.expand(x.shape[0])
        t_input = get_model_input_time(t_continuous)
        output = model(x, t_input, **model_kwargs)
        if model_type == "noise":
            return output

    def model_fn(x, t_continuous):
        if t_continuous.reshape((-1,)).shape[0] == 1:
            t_continuous = t_continuous.expand(x.shape[0])
        if guidance_type == "uncond":
            return noise_pred_fn(x, t_continuous)

    return model_fn


class UniPC:
    def __init__(self, model_fn, noise_schedule, predict_x0=True, thresholding=False, max_val=1., variant='bh1'):
        self.model = model_fn
        self.noise_schedule = noise_schedule
        self.variant = variant
        self.predict_x0 = predict_x0
        self.thresholding = thresholding
        self.max_val = max_val

    def noise_prediction_fn(self, x, t):
        return self.model(x, t)

    def data_prediction_fn(self, x, t):
        noise = self.noise_prediction_fn(x, t)
        dims = x.dim()
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        x0 = (x - expand_dims(sigma_t, dims) * noise) / expand_dims(alpha_t, dims)
        return x0

    def model_fn(self, x, t):
        if self.predict_x0:
            return self.data_prediction_fn(x, t)
        else:
            return self.noise_prediction_fn(x, t)

    def multistep_uni_pc_update(self, x, model_prev_list, t_prev_list, t, order, **kwargs):
        if len(t.shape) == 0:
            t = t.view(-1)
        return self.multistep_uni_pc_bh_update(x, model_prev_list, t_prev_list, t, order, **kwargs)

    def multistep_uni_pc_bh_update(self, x, model_prev_list, t_prev_list, t, order, x_t=None, use_corrector=True):
        ns = self.noise_schedule
        assert order <= len(model_prev_list)
        dims = x.dim()
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0 = ns.marginal_lambda(t_prev_0)
        lambda_t = ns.marginal_lambda(t)
        model_prev_0 = model_prev_list[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        log_alpha_prev_0, log_alpha_t = ns.marginal_log_mean_coeff(t_prev_0), ns.marginal_log_mean_coeff(t)  # noqa: F841
        alpha_t = torch.exp(log_alpha_t)
        h = lambda_t - lambda_prev_0
        rks = []
        D1s = []
        for i in range(1, order):
            t_prev_i = t_prev_list[-(i + 1)]
            model_prev_i = model_prev_list[-(i + 1)]
            lambda_prev_i = ns.marginal_lambda(t_prev_i)
            rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks, device=x.device)
        R = []
        b = []
        hh = -h[0] if self.predict_x0 else h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        if self.variant == 'bh1':
            B_h = hh
        elif self.variant == 'bh2':
            B_h = torch.expm1(hh)
        else:
            raise NotImplementedError()
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R = torch.stack(R)
        b = torch.tensor(b, device=x.device)
        use_predictor = len(D1s) > 0 and x_t is None
        if len(D1s) > 0:
            D1s = torch.stack(D1s, dim=1)
            if x_t is None:
                if order == 2:
                    rhos_p = torch.tensor([0.5], device=b.device)
                else:
                    rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            D1s = None
        if use_corrector:
            if order == 1:
                rhos_c = torch.tensor([0.5], device=b.device)
            else:
                rhos_c = torch.linalg.solve(R, b)
        model_t = None
        x_t_ = (
            expand_dims(sigma_t / sigma_prev_0, dims) * x
            - expand_dims(alpha_t * h_phi_1, dims) * model_prev_0
        )
        if x_t is None:
            if use_predictor:
                pred_res = torch.einsum('k,bkchw->bchw', rhos_p, D1s)
            else:
                pred_res = 0
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * pred_res
        if use_corrector:
            model_t = self.model_fn(x_t, t)
            if D1s is not None:
                corr_res = torch.einsum('k,bkchw->bchw', rhos_c[:-1], D1s)
            else:
                corr_res = 0
            D1_t = (model_t - model_prev_0)
            x_t = x_t_ - expand_dims(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * D1_t)
        return x_t, model_t

    def sample(self, x, timesteps, t_start=None, t_end=None, order=3, skip_type='time_uniform',
               method='singlestep', lower_order_final=True, denoise_to_zero=False, solver_type='dpm_solver',
               atol=0.0078, rtol=0.05, corrector=False, callback=None, disable_pbar=False):
        steps = len(timesteps) - 1
        if method == 'multistep':
            assert steps >= order
            assert timesteps.shape[0] - 1 == steps
            for step_index in trange(steps, disable=disable_pbar):
                if step_index == 0:
                    vec_t = timesteps[0].expand(x.shape[0])
                    model_prev_list = [self.model_fn(x, vec_t)]
                    t_prev_list = [vec_t]
                elif step_index < order:
                    init_order = step_index
                    vec_t = timesteps[init_order].expand(x.shape[0])
                    x, model_x = self.multistep_uni_pc_update(x, model_prev_list, t_prev_list, vec_t, init_order,
                                                              use_corrector=True)
                    if model_x is None:
                        model_x = self.model_fn(x, vec_t)
                    model_prev_list.append(model_x)
                    t_prev_list.append(vec_t)
                else:
                    extra_final_step = 0
                    if step_index == (steps - 1):
                        extra_final_step = 1
                    for step in range(step_index, step_index + 1 + extra_final_step):
                        vec_t = timesteps[step].expand(x.shape[0])
                        if lower_order_final:
                            step_order = min(order, steps + 1 - step)
                        else:
                            step_order = order
                        if step == steps:
                            use_corrector = False
                        else:
                            use_corrector = True
                        x, model_x = self.multistep_uni_pc_update(x, model_prev_list, t_prev_list, vec_t, step_order,
                                                                  use_corrector=use_corrector)
                        for i in range(order - 1):
                            t_prev_list[i] = t_prev_list[i + 1]
                            model_prev_list[i] = model_prev_list[i + 1]
                        t_prev_list[-1] = vec_t
                        if step < steps:
                            if model_x is None:
                                model_x = self.model_fn(x, vec_t)
                            model_prev_list[-1] = model_x
                if callback is not None:
                    callback({'x': x, 'i': step_index, 'denoised': model_prev_list[-1]})
        else:
            raise NotImplementedError()
        return x


def comfy_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=False, variant='bh1'):
    sigmas = sigmas.clone()  # ComfyUI writes 0.001 into the caller's sigmas; not the test's
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps = sigmas[:]
        timesteps[-1] = 0.001
    else:
        timesteps = sigmas.clone()
    ns = SigmaConvert()
    noise = noise / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    model_type = "noise"
    model_fn = model_wrapper(
        lambda input, sigma, **kwargs: predict_eps_sigma(model, input, sigma, **kwargs),
        ns,
        model_type=model_type,
        guidance_type="uncond",
        model_kwargs=extra_args or {},
    )
    order = min(3, len(timesteps) - 2)
    uni_pc = UniPC(model_fn, ns, predict_x0=True, thresholding=False, variant=variant)
    x = uni_pc.sample(noise, timesteps=timesteps, skip_type="time_uniform", method="multistep", order=order,
                      lower_order_final=True, callback=callback, disable_pbar=disable)
    x /= ns.marginal_alpha(timesteps[-1])
    return x


# ---- the comparisons ------------------------------------------------------------------------------
def _check(ours, oracle, n_steps=13, seed=0, **kw):
    """ours == oracle in float64 (1e-12) and in float32 on a non-contiguous x (1e-5); one
    model call per step."""
    sig32 = karras(n_steps)
    sig64 = sig32.to(F64)
    x = x_start(sig64, seed)
    ref = oracle(denoiser, x.clone(), sig64.clone(), **kw)
    m = Counting()
    out64 = ours(m, x.clone(), sig64, **kw)
    assert out64.dtype == F64
    assert max_rel_err(out64, ref) < 1e-12
    assert m.calls == n_steps
    out32 = ours(denoiser, noncontig(x.float()), sig32, **kw)
    assert out32.dtype == torch.float32
    assert max_rel_err(out32, ref) < 1e-5
    return ref


@pytest.mark.parametrize("max_order", [4, 3, 2, 1])
def test_ipndm(max_order):
    ref = _check(S.sample_ipndm, comfy_ipndm if max_order > 1 else _comfy_euler, max_order=max_order)
    assert ref.abs().max() < 10  # the toy ODE ends near the data scale, not blown up


@pytest.mark.parametrize("max_order", [4, 3, 2])
def test_ipndm_v(max_order):
    _check(S.sample_ipndm_v, comfy_ipndm_v, max_order=max_order)


def _comfy_euler(model, x, sigmas, max_order=1):
    """ComfyUI's iPNDM at max_order=1 raises IndexError (its buffer update indexes an empty
    list); the steps it would take are Euler's, and the last one returns D."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = denoised if sigmas[i + 1] == 0 else x + (sigmas[i + 1] - sigmas[i]) * to_d(x, sigmas[i] * s_in, denoised)
    return x


def test_ipndm_v_differs_from_ipndm_on_uneven_steps():
    """The variable-step weights are not the fixed ones on Karras spacing (a test that the
    two samplers are not one road)."""
    sig = karras(13).to(F64)
    x = x_start(sig)
    a = S.sample_ipndm(denoiser, x, sig)
    b = S.sample_ipndm_v(denoiser, x, sig)
    assert max_rel_err(a, b) > 1e-4


@pytest.mark.parametrize("max_order", [3, 4])
def test_deis(max_order):
    _check(S.sample_deis, comfy_deis, max_order=max_order)


def test_deis_table_is_the_vp_integral():
    """The tabulated coefficients integrate the VP exponential integrator: with constant d
    (the Lagrange weights sum to 1), the step's total sum_j C[i][j] is the integral of
    -0.5 dlog(alpha)/dtau / sqrt(alpha (1 - alpha)) over [t_i, t_{i+1}], which is
    sigma(t_{i+1}) - sigma(t_i) of the VP fit; within the N-point Riemann sum's error."""
    sig = [float(s) for s in karras(13).to(F64)]
    table = C._deis_tab(sig, 3)
    b0, bd, b1 = C._deis_vp_fit()
    for i, row in table.items():
        t = [((b0 * b0 + 2 * bd * math.log(s * s + 1)) ** 0.5 - b0) / bd for s in (sig[i], sig[i + 1])]
        vp_sigma = [math.sqrt(1 / math.exp(-0.5 * u * u * (b1 - b0) - u * b0) - 1) for u in t]
        assert sum(row) == pytest.approx(vp_sigma[1] - vp_sigma[0], rel=2e-3)


def test_deis_rhoab_is_refused():
    sig = karras(5).to(F64)
    with pytest.raises(NotImplementedError, match="rhoab"):
        S.sample_deis(denoiser, x_start(sig), sig, deis_mode="rhoab")


@pytest.mark.parametrize("s_noise", [1.0, 0.5])
def test_res_multistep(s_noise):
    _check(S.sample_res_multistep, comfy_res_multistep_eta0, s_noise=s_noise, noise_sampler=level_noise())


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.6, 0.8)])
def test_res_multistep_ancestral(eta, s_noise):
    ref = _check(S.sample_res_multistep_ancestral, comfy_res_multistep, eta=eta, s_noise=s_noise,
                 noise_sampler=level_noise())
    sig = karras(13).to(F64)
    det = comfy_res_multistep_eta0(denoiser, x_start(sig), sig, noise_sampler=level_noise())
    assert max_rel_err(ref, det) > 1e-2  # the noise is in the oracle, so in the comparison


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_res_multistep_calls_noise_sampler_where_comfyui_does(eta):
    sig = karras(11).to(F64)
    x = x_start(sig)
    ours, theirs = [], []
    S.sample_res_multistep_ancestral(denoiser, x, sig, eta=eta, noise_sampler=level_noise(ours))
    comfy_res_multistep(denoiser, x, sig, eta=eta, noise_sampler=level_noise(theirs))
    assert ours == theirs and len(ours) == len(sig) - 2


def test_res_multistep_ancestral_keyed_noise():
    """seeds=: step i draws z keyed by (seeds[b], step=i), i.e. the run equals the one given
    that z by a noise_sampler; sample b alone with its seed is the batch's row b."""
    sig = karras(11)
    x = x_start(sig.to(F64)).float()
    seeds = torch.tensor([11, 12, 13])
    steps = iter(range(len(sig)))
    keyed = S.sample_res_multistep_ancestral(denoiser, x, sig, seeds=seeds)

    def from_keys(sigma, sigma_next):
        i = next(steps)
        return _rng.keyed_noise(x, seeds, i)
    # the sampler calls noise_sampler on steps 0 .. n-2 in order (the last has sigma_next 0)
    given = S.sample_res_multistep_ancestral(denoiser, x, sig, noise_sampler=from_keys)
    assert max_rel_err(keyed, given) < 1e-6
    alone = S.sample_res_multistep_ancestral(denoiser, x[1:2], sig, seeds=seeds[1:2])
    assert torch.equal(alone[0], keyed[1])
    assert max_rel_err(keyed, S.sample_res_multistep_ancestral(denoiser, x, sig, seeds=seeds + 1)) > 1e-2


def test_res_multistep_ancestral_generator_reproducible():
    sig = karras(11)
    x = x_start(sig.to(F64)).float()
    a = S.sample_res_multistep_ancestral(denoiser, x, sig, generator=gen(3))
    b = S.sample_res_multistep_ancestral(denoiser, x, sig, generator=gen(3))
    c = S.sample_res_multistep_ancestral(denoiser, x, sig, generator=gen(4))
    assert torch.equal(a, b) and max_rel_err(a, c) > 1e-2


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("n_steps", [13, 4, 3, 2])
def test_unipc(variant, n_steps):
    ours = S.sample_unipc if variant == "bh1" else S.sample_unipc_bh2
    _check(ours, lambda m, x, s: comfy_unipc(m, x, s, variant=variant), n_steps=n_steps)


def test_unipc_one_step_and_nonzero_end():
    """One step: ComfyUI evaluates the model and returns the start rescaled to the last
    level; a schedule not ending at 0 runs to its own last sigma."""
    sig = karras(1).to(F64)
    x = x_start(sig)
    assert max_rel_err(S.sample_unipc(denoiser, x, sig), comfy_unipc(denoiser, x, sig)) < 1e-12
    sig = karras(9)[:-1].to(F64)
    x = x_start(sig)
    ref = comfy_unipc(denoiser, x, sig, variant="bh2")
    assert max_rel_err(S.sample_unipc_bh2(denoiser, x, sig), ref) < 1e-12


@pytest.mark.parametrize("n_steps", [8, 2])
def test_unipc_callback(n_steps):
    """The callback sees ComfyUI's (VP-scaled) x, step index and x0, every step."""
    sig = karras(n_steps).to(F64)
    x = x_start(sig)
    ours, theirs = [], []
    S.sample_unipc(denoiser, x, sig, callback=ours.append)
    # ComfyUI divides its last x in place after the last callback: keep a copy
    comfy_unipc(denoiser, x, sig, callback=lambda d: theirs.append(dict(d, x=d['x'].clone())))
    assert [d['i'] for d in ours] == [d['i'] for d in theirs] == list(range(n_steps))
    for a, b in zip(ours, theirs, strict=True):
        assert max_rel_err(a['x'], b['x']) < 1e-12
        assert max_rel_err(a['denoised'], b['denoised']) < 1e-12


def test_unipc_leaves_sigmas_alone():
    sig = karras(6).to(F64)
    before = sig.clone()
    S.sample_unipc(denoiser, x_start(sig), sig)
    assert torch.equal(sig, before)


@pytest.mark.parametrize("name", ["sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep",
                                  "sample_res_multistep_ancestral", "sample_unipc", "sample_unipc_bh2"])
def test_one_fused_pass_per_model_evaluation(name, monkeypatch):
    """Every update is one linear_step call, never more than the model evaluations: the
    derivative / x0 history and UniPC's corrected x are further output rows of that call."""
    calls = []
    real = C.linear_step

    def counting(inputs, coeffs, **kw):
        calls.append(len(coeffs))
        return real(inputs, coeffs, **kw)

    monkeypatch.setattr(C, "linear_step", counting)
    sig = karras(12).to(F64)
    m = Counting()
    kw = {"generator": gen(0)} if name == "sample_res_multistep_ancestral" else {}
    getattr(S, name)(m, x_start(sig), sig, disable=True, **kw)
    assert m.calls == len(sig) - 1
    # iPNDM/DEIS's last step to 0 returns D itself (ComfyUI's x' = D): no pass there
    assert len(calls) == m.calls - (name in ("sample_ipndm", "sample_ipndm_v"))
    assert max(calls) <= 2


def _inner(x_in, t):
    """A nonlinear epsilon / v network at the wrappers' scaled input and fractional t."""
    tt = t.to(F64).reshape(-1, *([1] * (x_in.dim() - 1)))
    return (0.6 * torch.tanh(x_in.to(F64)) + 1e-4 * tt * x_in.to(F64)).to(x_in.dtype)


@pytest.mark.parametrize("wrapper", [S.EpsDenoiser, S.VDenoiser], ids=["eps", "v"])
@pytest.mark.parametrize("name", ["sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep",
                                  "sample_res_multistep_ancestral"])
def test_wrapped_models_fold_the_conversion(wrapper, name):
    """With k-diffusion's EpsDenoiser / VDenoiser (diffkern's) and no callback the samplers
    take the raw epsilon / v and fold D = a x + b m into the step's coefficients (the
    wrapper's forward never runs): the same samples as through the wrapper's forward."""
    class Counted(wrapper):
        forwards = 0

        def forward(self, *a, **k):
            Counted.forwards += 1
            return super().forward(*a, **k)

    w = Counted(_inner, dk.NoiseSchedule.linear())
    sig = karras(12).to(F64)
    x = x_start(sig)
    kw = {"noise_sampler": level_noise()} if "res_" in name else {}
    fused = getattr(S, name)(w, x, sig, **kw)
    assert Counted.forwards == 0
    plain = getattr(S, name)(lambda x_, s_: w(x_, s_), x, sig, **kw)
    assert Counted.forwards == len(sig) - 1
    assert max_rel_err(fused, plain) < 1e-12


@pytest.mark.parametrize("name,promotes", [("sample_ipndm", False), ("sample_deis", False),
                                           ("sample_res_multistep", True), ("sample_unipc", False)])
def test_result_dtype_follows_comfyui(name, promotes):
    """float32 x with float64 sigmas: ComfyUI's res_multistep promotes x in its first
    (Euler, to_d) step; iPNDM/DEIS/UniPC keep x's dtype (their sigma factors are 0-d)."""
    sig = karras(6).to(F64)
    out = getattr(S, name)(denoiser, x_start(sig).float(), sig, disable=True)
    assert out.dtype == (F64 if promotes else torch.float32)


@pytest.mark.parametrize("name,oracle", [("sample_ipndm", comfy_ipndm), ("sample_ipndm_v", comfy_ipndm_v),
                                         ("sample_deis", comfy_deis),
                                         ("sample_res_multistep_ancestral", comfy_res_multistep)])
def test_schedule_not_ending_at_zero(name, oracle):
    """A schedule that stops at sigma_min (no denoising step): every step is a multistep one."""
    sig = karras(10)[:-1].to(F64)
    x = x_start(sig, seed=3)
    kw = {"noise_sampler": level_noise()} if "res_" in name else {}
    ref = oracle(denoiser, x.clone(), sig.clone(), **kw)
    assert max_rel_err(getattr(S, name)(denoiser, x, sig, **kw), ref) < 1e-12


@pytest.mark.parametrize("name", ["sample_ipndm", "sample_deis", "sample_res_multistep_ancestral", "sample_unipc"])
def test_per_sample_sigmas_are_refused(name):
    sig = karras(5).to(F64)
    x = x_start(sig)
    with pytest.raises(ValueError, match="1-D sigmas"):
        getattr(S, name)(denoiser, x, sig[:, None].expand(-1, x.shape[0]))
