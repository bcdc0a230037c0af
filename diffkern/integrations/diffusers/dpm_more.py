"""The other multistep DPM-Solver drop-ins, on dpm.py's coefficient tables and step:
FusedDPMSolverMultistepInverseScheduler (inversion for editing) and
FusedEDMDPMSolverMultistepScheduler (EDM preconditioning)."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepInverseScheduler, EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from . import _base as B
from .dpm import DPMSolverMultistepMixin, DPMSolverVPMixin

__all__ = ["FusedDPMSolverMultistepInverseScheduler", "FusedEDMDPMSolverMultistepScheduler"]


class FusedDPMSolverMultistepInverseScheduler(DPMSolverVPMixin, DPMSolverMultistepInverseScheduler):
    """:class:`diffusers.DPMSolverMultistepInverseScheduler` with one fused ``linear_step``
    per step (two with ``thresholding``): ``dpmsolver++`` and ``dpmsolver``, orders 1-3,
    both solver types, flow sigmas. ``add_noise`` is stock's.

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
    ``variance_noise=`` (keyword). ``scale_model_input`` / ``add_noise`` are stock's.

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

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *,
             variance_noise=None):
        """EDMDPMSolverMultistepScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        prev = self._dk_step(model_output, timestep, sample, generator, variance_noise)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        if prev.dtype != out_dtype:
            prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)
