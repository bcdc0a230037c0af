"""The other multistep DPM-Solver drop-ins: FusedDPMSolverMultistepInverseScheduler
(inversion for editing) and FusedEDMDPMSolverMultistepScheduler (EDM preconditioning) on
dpm.py's coefficient tables and step; FusedCogVideoXDPMScheduler (its own DDIM-timestep
form of DPM-Solver++(2M) SDE) on the same road, linear_step with host coefficients."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, DPMSolverMultistepInverseScheduler, EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_dpm_cogvideox import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B
from .dpm import DPMSolverMultistepMixin, DPMSolverVPMixin

__all__ = ["FusedDPMSolverMultistepInverseScheduler", "FusedEDMDPMSolverMultistepScheduler",
           "FusedCogVideoXDPMScheduler"]


class FusedDPMSolverMultistepInverseScheduler(DPMSolverVPMixin, DPMSolverMultistepInverseScheduler):
    """:class:`diffusers.DPMSolverMultistepInverseScheduler` with one fused ``linear_step``
    per step (two with ``thresholding``): ``dpmsolver++`` and ``dpmsolver``, orders 1-3,
    both solver types, flow sigmas.

    Not supported (``NotImplementedError`` at construction): the SDE types (going up in
    noise h < 0, and stock's noise scale ``sqrt(1 - exp(-2h))`` / ``sqrt(exp(2h) - 1)``
    is the square root of a negative number: stock returns NaN from the first step), and
    ``flow_prediction`` with ``dpmsolver`` (stock raises at the step)."""

    _dk_noise_dtype = None  # stock draws in the model output's dtype
    _begin_index = None  # stock's inverse has no begin index (the step finds its own)

    def _dk_check_config(self):
        if self.config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            raise B.unsupported(self, "algorithm_type", self.config.algorithm_type,
                                "stock's noise scale is the square root of a negative number here: NaN")
        super()._dk_check_config()

    def _dk_lower_final(self, i, n):
        c = self.config  # the inverse's last step goes up to sigma_max: no final_sigmas_type clause
        return i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15))


class FusedEDMDPMSolverMultistepScheduler(DPMSolverMultistepMixin, EDMDPMSolverMultistepScheduler):
    """:class:`diffusers.EDMDPMSolverMultistepScheduler` with one fused ``linear_step`` per
    step (two with ``thresholding``): the EDM preconditioning ``c_skip x + c_out m`` is
    folded into the coefficients (alpha = 1, sigma = the EDM sigma). ``dpmsolver++`` and
    ``sde-dpmsolver++`` (stock's noise), orders 1-3. ``step`` also takes
    ``variance_noise=`` (keyword). ``scale_model_input`` and ``add_noise`` read no tensor on
    the host.

    Not supported (``NotImplementedError`` at construction): ``prediction_type="sample"``
    (stock's preconditioning raises at the first step), ``sde-dpmsolver++`` with
    ``solver_order=3`` (stock's third-order update has no noise term and fails)."""

    _dk_noise_dtype = None

    def _dk_check_config(self):
        c = self.config
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise B.unsupported(self, "prediction_type", c.prediction_type,
                                "stock's precondition_outputs raises for it")
        if c.algorithm_type == "sde-dpmsolver++" and c.solver_order == 3:
            raise B.unsupported(self, "solver_order", 3, "stock has no third-order sde-dpmsolver++ update here")

    def _dk_alpha_sigma(self, sigma):
        return 1.0, sigma  # the inputs are preconditioned: alpha_t = 1

    def _dk_convert(self, sigma):
        sd = self.config.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        return c_skip, (c_out if self.config.prediction_type == "epsilon" else -c_out)

    def scale_model_input(self, sample, timestep):
        """Stock's ``c_in(sigma) sample``, sigma found as the step finds it (stock's
        lookup reads the timestep on the host); a (B,) timestep scales each sample."""
        st = self._dk_state(sample.device)
        sd2 = self.config.sigma_data ** 2
        i = self._dk_host_index(timestep, st)
        self.is_scale_input_called = True
        if i is not None:
            return sample * (1 / (st.sig_host[i] ** 2 + sd2) ** 0.5)
        idx, valid = self._dk_positions(timestep, sample, st)
        sigma = self._dk_take(st.sig_dev, idx, valid).reshape((-1,) + (1,) * (sample.dim() - 1))
        return sample * (1 / (sigma ** 2 + sd2) ** 0.5).to(sample.dtype)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *,
             variance_noise=None):
        """EDMDPMSolverMultistepScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        prev = self._dk_step(model_output, timestep, sample, generator, variance_noise)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if prev.dtype != out_dtype:
            prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)


class FusedCogVideoXDPMScheduler(B.FusedSchedulerMixin, CogVideoXDPMScheduler):
    """:class:`diffusers.CogVideoXDPMScheduler` (CogVideoX's DPM-Solver++(2M) SDE in DDIM
    timesteps) with one fused ``linear_step`` per step: the prediction-type conversion,
    the first- or second-order update and the noise term in one pass, the step's x0 as
    the second output (what stock returns as ``pred_original_sample``). The coefficients
    are stock's formulas in float64 on the host from the host ``alphas_cumprod``.

    Noise: stock draws a noise tensor on every step and, on a second-order step, a second
    one (the first result is discarded); in the default noise mode the fused step makes
    both draws (same seed, same video), and uses the second. ``variance_noise=`` (stock
    ignores it) is taken as the step's noise. A timestep that is an element of
    ``self.timesteps`` (as the pipeline passes it) is found without a host read; any
    other is read once (stock reads it too). A (B,) timestep is refused (stock's step
    compares it with 0 as a Python bool and raises)."""

    def _dk_check_config(self):
        if self.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, "
                             "`sample`, or `v_prediction`")

    def _dk_build(self, device):
        return B._State(ac=[float(v) for v in self.alphas_cumprod.detach().cpu().double().tolist()],
                        final=float(self.final_alpha_cumprod), ts_host=self.timesteps.detach().cpu().tolist(),
                        rows={})

    def _dk_int(self, timestep, st):
        """The timestep's value on the host: its position when it is an element of
        ``self.timesteps`` (no read), else one read."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise NotImplementedError(f"{type(self).__name__}.step takes one timestep for the batch (stock "
                                          "compares it with 0 as a Python bool)")
            i = self._dk_index_of(timestep)
            return st.ts_host[i] if i is not None else int(timestep.reshape(()).item())
        return int(timestep)

    def _dk_coeffs(self, st, t, t_back):
        """(rows, noise coefficients, second order) of the step from t (and t_back), cached."""
        key = (t, t_back)
        hit = st.rows.get(key)
        if hit is not None:
            return hit
        c = self.config
        prev = t - c.num_train_timesteps // self.num_inference_steps
        a_t = np.float64(st.ac[t])
        a_p = np.float64(st.ac[prev] if prev >= 0 else st.final)
        second = t_back is not None and prev >= 0
        with np.errstate(all="ignore"):  # a zero-SNR end gives stock's inf / nan, not an exception
            cx, cm = {"epsilon": (1 / np.sqrt(a_t), -np.sqrt(1 - a_t) / np.sqrt(a_t)), "sample": (0.0, 1.0),
                      "v_prediction": (np.sqrt(a_t), -np.sqrt(1 - a_t))}[c.prediction_type]
            lam = np.log(np.sqrt(a_t / (1 - a_t)))
            h = np.log(np.sqrt(a_p / (1 - a_p))) - lam
            m1 = np.sqrt((1 - a_p) / (1 - a_t)) * np.exp(-h)
            m2 = np.expm1(-2 * h) * np.sqrt(a_p)
            mz = np.sqrt(1 - a_p) * np.sqrt(1 - np.exp(-2 * h))
            if second:  # x0 replaced by mult3 x0 - mult4 old
                a_b = np.float64(st.ac[t_back])
                r = (lam - np.log(np.sqrt(a_b / (1 - a_b)))) / h
                m3, m4 = 1 + 1 / (2 * r), 1 / (2 * r)
                rows = ((m1 - m2 * m3 * cx, -m2 * m3 * cm, m2 * m4), (cx, cm, 0.0))
            else:
                rows = ((m1 - m2 * cx, -m2 * cm), (cx, cm))
        hit = st.rows[key] = (tuple(tuple(float(v) for v in r) for r in rows), (float(mz), 0.0), second)
        return hit

    def step(self, model_output, old_pred_original_sample, timestep, timestep_back, sample, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = False):
        """CogVideoXDPMScheduler.step, fused: returns (prev_sample, pred_original_sample)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        st = self._dk_state(sample.device)
        t = self._dk_int(timestep, st)
        tb = None if timestep_back is None else self._dk_int(timestep_back, st)
        rows, nz, second = self._dk_coeffs(st, t, tb)
        second = second and old_pred_original_sample is not None
        if not second and len(rows[0]) == 3:  # t_back given but no old x0: stock's first-order update
            rows, nz, _ = self._dk_coeffs(st, t, None)
        if variance_noise is not None:
            noise, gen = B._check_variance_noise(sample, generator, variance_noise)
        else:
            if second and self.noise_mode == "stock":
                B.step_noise(self, sample, generator, None, True)  # stock's first draw, whose result it discards
            noise, gen = B.step_noise(self, sample, generator, None, True)
        inputs = [sample, model_output] + ([old_pred_original_sample] if second else [])
        prev, x0 = U.linear_step(inputs, rows, nz, noise, gen)
        if not second or not return_dict:
            return prev, x0
        return B.output(DDIMSchedulerOutput, prev, x0)
