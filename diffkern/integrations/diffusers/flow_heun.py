"""FusedFlowMatchHeunDiscreteScheduler: FlowMatchHeunDiscreteScheduler with one
dk.linear_step per model evaluation."""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchHeunDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_heun_discrete import FlowMatchHeunDiscreteSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedFlowMatchHeunDiscreteScheduler"]


class FusedFlowMatchHeunDiscreteScheduler(B.IndexedSchedulerMixin, FlowMatchHeunDiscreteScheduler):
    """:class:`diffusers.FlowMatchHeunDiscreteScheduler` with one fused pass per stage.

    Stock's derivative is (x - (x - sigma v)) / sigma_hat, i.e. (sigma / sigma_hat) v, so
    the first stage is ``x + (sigma / sigma_hat) dt v`` (plus the churn noise, whose
    x_hat is a second row of the same call) and the second ``x_hat + dt/2 ((sigma /
    sigma_hat) v1 + v2)``: the first stage keeps the velocity ``v1`` in
    ``prev_derivative`` (stock: the derivative; equal without churn) and the factor on the
    host. Churn noise is stock's ``randn_tensor`` numbers, drawn (and, as stock, unused) at
    a second stage too. Every config is supported. A (B,) timestep, and torch.compile,
    find each sample's position on the device and need ``s_churn = 0``; ``dt`` is then a
    (B,) device tensor."""

    def _dk_check_config(self):
        pass

    def _dk_build(self, device):
        return B._State(**self._dk_sigma_tables(device))

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        """FlowMatchHeunDiscreteScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchHeunDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        st = self._dk_state(sample.device)
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)  # stock upcasts the sample
        m = model_output
        first = self.state_in_first_order
        i = self._dk_host_index(timestep, st)
        if i is None:
            prev = self._dk_step_per_sample(m, timestep, x, st, first, s_churn)
        else:
            sigma = st.sig_host[i] if first else st.sig_host[i - 1]
            sigma_next = st.sig_host[i + 1] if first else st.sig_host[i]
            gamma = min(s_churn / (len(st.sig_host) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            # a second stage draws too (stock draws, then drops the noised sample)
            z, gen = B.step_noise(self, x, generator, None, gamma > 0, shape=tuple(m.shape), dtype=m.dtype)
            if first:
                dt = sigma_next - sigma_hat
                f = sigma / sigma_hat
                if gamma > 0:
                    a = s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)
                    prev, x_hat = U.linear_step([x, m], ((1.0, f * dt), (1.0, 0.0)), (a, a), z, gen)
                else:
                    (prev,), x_hat = U.linear_step([x, m], ((1.0, f * dt),)), x
                self.prev_derivative, self.dt, self.sample, self._dk_factor = m, dt, x_hat, f
            else:
                prev = self._dk_second_stage(m)
        if prev.dtype != m.dtype:
            prev = prev.to(m.dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(FlowMatchHeunDiscreteSchedulerOutput, prev)

    def _dk_step_per_sample(self, m, timestep, x, st, first, s_churn):
        if s_churn > 0:
            raise NotImplementedError("s_churn > 0 needs a scalar timestep outside torch.compile (the churn "
                                      "decision s_tmin <= sigma <= s_tmax is taken on the host)")
        if first:
            # a first stage sits at the second copy of its timestep (stock's schedule repeats each)
            idx, valid = self._dk_positions(timestep, x, st, last=True)
            dt = self._dk_take(st.sig_dev, idx + 1, valid).double() - self._dk_take(st.sig_dev, idx, valid).double()
            one = torch.ones_like(dt)
            (prev,) = U.linear_step([x, m], torch.stack([one, dt], -1).unsqueeze(1))
            self.prev_derivative, self.dt, self.sample, self._dk_factor = m, dt, x, 1.0
            return prev
        return self._dk_second_stage(m)

    def _dk_second_stage(self, m):
        """x_hat + dt/2 (f v1 + v2), dt as the first stage left it: a host float, or a (B,)
        device tensor after a per-sample first stage (either stage may be per-sample)."""
        dt, f = self.dt, self._dk_factor
        if isinstance(dt, torch.Tensor):
            h = 0.5 * dt
            coeffs = torch.stack([torch.ones_like(h), h * f, h], -1).unsqueeze(1)
        else:
            coeffs = ((1.0, 0.5 * dt * f, 0.5 * dt),)
        (prev,) = U.linear_step([self.sample, self.prev_derivative, m], coeffs)
        self.prev_derivative = self.dt = self.sample = None
        return prev
