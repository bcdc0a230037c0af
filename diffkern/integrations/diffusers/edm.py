"""FusedEDMEulerScheduler: EDMEulerScheduler with one dk.linear_step per step."""

from __future__ import annotations

import logging
import math

import torch
from diffusers import EDMEulerScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedEDMEulerScheduler"]

logger = logging.getLogger("diffusers.schedulers.scheduling_edm_euler")


def _edm_coeffs(sigma: float, sigma_next: float, gamma: float, s_noise: float, sigma_data: float, eps: bool):
    """The step's rows over (x, model_output) and its noise coefficients, in float64.

    x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z, x0 = c_skip x_hat + c_out m,
    prev = x_hat + (x_hat - x0) / sigma_hat (sigma_next - sigma_hat) = (1 + r) x_hat - r x0."""
    sigma_hat = sigma * (gamma + 1)
    d2 = sigma_hat * sigma_hat + sigma_data * sigma_data
    c_skip = sigma_data * sigma_data / d2
    c_out = (1.0 if eps else -1.0) * sigma_hat * sigma_data / math.sqrt(d2)
    r = (sigma_next - sigma_hat) / sigma_hat
    a = s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma) if gamma > 0 else 0.0
    # rows 0, 1: prev and x0 over (x, m); row 2: prev over (x, x0) for a given x0
    return ((1 + r - r * c_skip, -r * c_out), (c_skip, c_out), (1 + r, -r)), a


def _take_rows(table: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each sample's (K, J) coefficient rows, NaN where its timestep is not in the schedule."""
    v = table.index_select(0, idx.clamp(0, table.shape[0] - 1))
    return torch.where(valid.reshape(-1, 1, 1), v, torch.full_like(v, float("nan")))


class FusedEDMEulerScheduler(B.IndexedSchedulerMixin, EDMEulerScheduler):
    """:class:`diffusers.EDMEulerScheduler` with one fused pass per step: the EDM
    preconditioning (c_skip, c_out) is linear in (x, model_output), so the step and its
    ``pred_original_sample`` are the two rows of one ``linear_step`` call, with the churn
    noise (``s_churn > 0``; stock's ``randn_tensor`` numbers) as its noise operand.

    Every config stock accepts is supported. A (B,) timestep, and torch.compile, take the
    per-sample coefficients from a table built in ``set_timesteps`` and need
    ``s_churn = 0`` (the churn decision ``s_tmin <= sigma <= s_tmax`` is taken on the host).
    """

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in ("epsilon", "v_prediction"):
            raise ValueError(f"Prediction type {p} is not supported.")

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = self.sigmas.detach().to("cpu", torch.float32)
        c_in = self._get_conditioning_c_in(sig)  # float32, as stock forms it
        eps = self.config.prediction_type == "epsilon"
        sd = float(self.config.sigma_data)
        s = tabs["sig_host"]
        coef = [_edm_coeffs(s[i], s[i + 1], 0.0, 1.0, sd, eps)[0] for i in range(len(s) - 1)]
        return B._State(**tabs, c_in_host=c_in.tolist(), c_in_dev=B.const_tensor(c_in, device, torch.float32),
                        coef_dev=B.const_tensor([c[:2] for c in coef], device, torch.float64),
                        x0coef_dev=B.const_tensor([c[2:] for c in coef], device, torch.float64))

    def scale_model_input(self, sample, timestep):
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        self.is_scale_input_called = True
        if i is not None:
            return sample * st.c_in_host[i]
        idx, valid = self._dk_positions(timestep, sample, st)
        c = self._dk_take(st.c_in_dev, idx, valid)
        return sample * c.reshape(-1, *([1] * (sample.dim() - 1))).to(sample.dtype)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True,
             pred_original_sample=None):
        """EDMEulerScheduler.step, fused; ``timestep`` may be a (B,) tensor (``s_churn = 0``)."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `EDMEulerScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        st = self._dk_state(sample.device)
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)  # stock upcasts the sample
        m = model_output
        i = self._dk_host_index(timestep, st)
        noise = gen = None
        draws = False
        if i is not None:
            sigma, sigma_next = st.sig_host[i], st.sig_host[i + 1]
            gamma = min(s_churn / (len(st.sig_host) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
            rows, a = _edm_coeffs(sigma, sigma_next, gamma, float(s_noise), float(self.config.sigma_data),
                                  self.config.prediction_type == "epsilon")
            draws = gamma > 0
            noise, gen = B.step_noise(self, x, generator, None, draws, shape=tuple(m.shape), dtype=m.dtype)
            step_rows, x0_row = rows[:2], rows[2:]
            ncoef = (rows[0][0] * a, rows[1][0] * a) if draws else None
            x0_ncoef = (rows[2][0] * a,) if draws else None
        else:
            if s_churn > 0:
                raise NotImplementedError("s_churn > 0 needs a scalar timestep outside torch.compile (the churn "
                                          "decision s_tmin <= sigma <= s_tmax is taken on the host)")
            idx, valid = self._dk_positions(timestep, x, st)
            step_rows, x0_row = _take_rows(st.coef_dev, idx, valid), _take_rows(st.x0coef_dev, idx, valid)
            ncoef, x0_ncoef = None, None
        if pred_original_sample is not None:
            x0 = pred_original_sample
            (prev,) = U.linear_step([x, x0], x0_row, x0_ncoef, noise, gen)
        else:
            prev, x0 = U.linear_step([x, m], step_rows, ncoef, noise, gen)
        if prev.dtype != m.dtype:
            prev = prev.to(m.dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(EDMEulerSchedulerOutput, prev, x0)

    def add_noise(self, original_samples, noise, timesteps):
        """Stock's ``x0 + sigma z`` (per-sample sigma found on the device: no host read)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        if self.begin_index is None:
            idx, valid = self._dk_positions(timesteps, x0, st)
            sigma = self._dk_take(st.sig_dev, idx, valid)
        else:
            i = self.step_index if self.step_index is not None else self.begin_index
            sigma = st.sig_host[i]
        return U.flow_step(x0, z, 0.0, sigma, False)
