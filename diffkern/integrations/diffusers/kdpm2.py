"""FusedKDPM2DiscreteScheduler and FusedKDPM2AncestralDiscreteScheduler: two model calls a
step (the first stage to the interpolated sigma, the second from the saved sample), each
stage one dk.linear_step."""

from __future__ import annotations

import torch
from diffusers import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput

from ... import unchecked as U
from . import _base as B
from .euler import _KarrasVEMixin

__all__ = ["FusedKDPM2DiscreteScheduler", "FusedKDPM2AncestralDiscreteScheduler"]


def _host(t: torch.Tensor) -> list:
    return t.detach().to("cpu", torch.float32).tolist()


class _KDPM2Mixin(_KarrasVEMixin):
    """What both KDPM2 variants share: the host tables, the model-input scaling by the
    stage's sigma and the stage update. Each stage is ``base + dt * d`` with the
    derivative ``d = (x - x0) / sigma_in`` and ``x0`` linear in (x, model output), so the
    new sample and ``pred_original_sample`` are the two rows of one ``linear_step`` over
    (x, model output[, the first stage's sample])."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p == "sample":
            raise B.unsupported(self, "prediction_type", p, f"stock {type(self)._dk_stock.__name__} does not "
                                "implement it either (it raises at the first step)")
        if p not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, or `v_prediction`")

    def _dk_build(self, device):
        st = super()._dk_build(device)
        interp = self.sigmas_interpol.detach().to("cpu", torch.float32)
        st.interp_host = interp.tolist()
        st.scale_interp_host = ((interp**2 + 1) ** 0.5).tolist()  # float32, as stock forms it
        return st

    def _dk_index(self, timestep, st) -> int:
        i = self._dk_host_index(timestep, st)
        if i is None:
            raise NotImplementedError(f"{type(self).__name__} needs a scalar timestep outside torch.compile (the "
                                      "stage and its saved sample are per loop)")
        return i

    def scale_model_input(self, sample, timestep):
        st = self._dk_state(sample.device)
        i = self._dk_index(timestep, st)
        scale = st.scale_host[i] if self.state_in_first_order else st.scale_interp_host[i + self._dk_interp_shift]
        return sample / scale

    def _dk_stage(self, x, m, base, sigma_in: float, dt: float, noise_coeff: float = 0.0, noise=None,
                  generator=None):
        """(base + dt * d [+ noise_coeff * z], x0) in one pass; ``base`` None is x."""
        if self.config.prediction_type == "epsilon":
            ax, am = 1.0, -sigma_in
            dx, dm = 0.0, 1.0
        else:  # v_prediction
            ax, am = 1 / (sigma_in**2 + 1), -sigma_in / (sigma_in**2 + 1) ** 0.5
            dx, dm = (1 - ax) / sigma_in, -am / sigma_in
        if base is None:
            inputs, rows = [x, m], [[1 + dt * dx, dt * dm], [ax, am]]
        else:
            inputs, rows = [x, m, base], [[dt * dx, dt * dm, 1.0], [ax, am, 0.0]]
        if noise_coeff or noise is not None or generator is not None:
            return U.linear_step(inputs, U.LinearCoeffs(rows, [noise_coeff, 0.0]), None, noise, generator)
        return U.linear_step(inputs, U.LinearCoeffs(rows))


class FusedKDPM2DiscreteScheduler(_KDPM2Mixin, KDPM2DiscreteScheduler):
    """:class:`diffusers.KDPM2DiscreteScheduler` with each of its two stages one fused pass
    (``linear_step``: the new sample and ``pred_original_sample`` as two rows). Every sigma
    option (Karras / exponential / beta sigmas, spacings) only shapes stock's tables.

    Not supported: ``prediction_type="sample"`` (stock raises NotImplementedError for it at
    the first step; here at construction), a (B,) timestep or a step under torch.compile
    (the stage is per loop)."""

    _dk_interp_shift = 0

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """KDPM2DiscreteScheduler.step, fused."""
        st = self._dk_state(sample.device)
        i = self._dk_index(timestep, st)
        x, m = sample, model_output
        if self.state_in_first_order:
            sigma, sigma_interpol = st.sig_host[i], st.interp_host[i + 1]
            prev, x0 = self._dk_stage(x, m, None, sigma, sigma_interpol - sigma)
            self.sample = x
        else:
            sigma, sigma_interpol, sigma_next = st.sig_host[i - 1], st.interp_host[i], st.sig_host[i]
            prev, x0 = self._dk_stage(x, m, self.sample, sigma_interpol, sigma_next - sigma)
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(KDPM2DiscreteSchedulerOutput, prev, x0)


class FusedKDPM2AncestralDiscreteScheduler(_KDPM2Mixin, KDPM2AncestralDiscreteScheduler):
    """:class:`diffusers.KDPM2AncestralDiscreteScheduler` with each of its two stages one
    fused pass; the second stage's noise is stock's own ``randn_tensor`` draw (same seed,
    same image; see the package's noise modes) or ``variance_noise=``.

    Not supported: ``prediction_type="sample"`` (stock raises NotImplementedError for it at
    the first step; here at construction), a (B,) timestep or a step under torch.compile."""

    _dk_interp_shift = -1

    def _dk_build(self, device):
        st = super()._dk_build(device)
        st.up_host, st.down_host = _host(self.sigmas_up), _host(self.sigmas_down)
        return st

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True,
             variance_noise=None):
        """KDPM2AncestralDiscreteScheduler.step, fused; ``variance_noise`` is the second
        stage's noise."""
        st = self._dk_state(sample.device)
        i = self._dk_index(timestep, st)
        x, m = sample, model_output
        if self.state_in_first_order:
            sigma, sigma_interpol = st.sig_host[i], st.interp_host[i]
            self.dt = sigma_interpol - sigma  # stock's attribute
            prev, x0 = self._dk_stage(x, m, None, sigma, self.dt)
            self.sample = x
        else:
            sigma, sigma_interpol = st.sig_host[i - 1], st.interp_host[i - 1]
            up, down = st.up_host[i - 1], st.down_host[i - 1]
            noise, gen = B.step_noise(self, x, generator, variance_noise, True, shape=tuple(m.shape), dtype=m.dtype)
            prev, x0 = self._dk_stage(x, m, self.sample, sigma_interpol, down - sigma, up, noise, gen)
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(KDPM2AncestralDiscreteSchedulerOutput, prev, x0)
