"""FusedFlowMatchEulerDiscreteScheduler: FlowMatchEulerDiscreteScheduler with dk.flow_step."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedFlowMatchEulerDiscreteScheduler"]


class FusedFlowMatchEulerDiscreteScheduler(B.IndexedSchedulerMixin, FlowMatchEulerDiscreteScheduler):
    """:class:`diffusers.FlowMatchEulerDiscreteScheduler` with a fused ``step``
    (``dk.flow_step``) and ``scale_noise`` (``dk.flow_q_sample``). Every schedule option
    (``shift``, dynamic shifting, ``shift_terminal``, ``invert_sigmas``, Karras /
    exponential / beta sigmas, custom ``sigmas`` / ``timesteps``) only shapes
    ``self.sigmas`` and is supported; ``stochastic_sampling`` uses the op's stochastic
    form (``variance_noise=`` gives its noise). As stock, ``s_churn`` etc. are accepted and
    ignored. ``per_token_timesteps`` runs stock's step (not fused: the op takes a sigma
    per sample, not per token); a (B,) ``timestep`` gives each sample its own sigma."""

    def _dk_check_config(self):
        pass

    def _dk_build(self, device):
        st = B._State(**self._dk_sigma_tables(device))
        # (sigma, sigma_next) per step index as Python floats: what the deterministic fast
        # path hands the kernel
        sig = st.sig_host
        st.pairs = list(zip(sig[:-1], sig[1:], strict=True))
        return st

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True, variance_noise=None):
        """FlowMatchEulerDiscreteScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if isinstance(timestep, int) or isinstance(timestep, (torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        i = self._step_index
        if (i is not None and per_token_timesteps is None and variance_noise is None
                and model_output.dtype == sample.dtype and not self.config.stochastic_sampling
                and (not isinstance(timestep, torch.Tensor) or timestep.dim() == 0)):
            # The common loop (a deterministic step past the first, one timestep): the same
            # op as below, without the argument handling that only the other cases need.
            # At 1x4x64x64 that handling cost more than the step's arithmetic.
            sigma, sigma_next = self._dk_state(sample.device).pairs[i]
            prev = U.flow_step(sample, model_output, sigma, sigma_next, False)
            self._step_index = i + 1
            return B.output(FlowMatchEulerDiscreteSchedulerOutput, prev) if return_dict else (prev,)
        if per_token_timesteps is not None:
            # a sigma per token, found by a search over the schedule: the fused op takes one
            # sigma per sample, so this step is stock's own (same numbers, same noise draw)
            if variance_noise is not None:
                raise NotImplementedError("variance_noise= with per_token_timesteps (stock's step draws its own)")
            return FlowMatchEulerDiscreteScheduler.step(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax,
                                                        s_noise, generator, per_token_timesteps, return_dict)
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        if i is not None:
            sigma, sigma_next = st.sig_host[i], st.sig_host[i + 1]
        else:
            idx, valid = self._dk_positions(timestep, sample, st)
            sigma, sigma_next = self._dk_take(st.sig_dev, idx, valid), self._dk_take(st.sig_dev, idx + 1, valid)
        stochastic = bool(self.config.stochastic_sampling)
        # stock draws in float32 (it upcasts the sample first)
        noise, gen = B.step_noise(self, sample, generator, variance_noise, stochastic, dtype=torch.float32)
        prev = U.flow_step(sample, model_output, sigma, sigma_next, stochastic, noise, gen)
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(FlowMatchEulerDiscreteSchedulerOutput, prev)

    def scale_noise(self, sample, timestep, noise=None):
        """Stock's ``sigma z + (1 - sigma) x`` (dk.flow_q_sample), each sample's sigma found
        on the device."""
        x0, z = B.promote(sample, noise)
        st = self._dk_state(x0.device)
        if self.begin_index is None:
            idx, valid = self._dk_positions(timestep, x0, st)
            sigma = self._dk_take(st.sig_dev, idx, valid)
        else:
            sigma = st.sig_host[self.step_index if self.step_index is not None else self.begin_index]
        return U.flow_q_sample(x0, sigma, z)[0]
