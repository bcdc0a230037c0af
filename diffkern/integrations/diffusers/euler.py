"""FusedEulerDiscreteScheduler and FusedEulerAncestralDiscreteScheduler (dk.euler_step),
and the k-diffusion-style scale_model_input / add_noise they share with Heun."""

from __future__ import annotations

import logging
import math
import sys

import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from ... import _validate as V
from ... import unchecked as U
from . import _base as B

__all__ = ["FusedEulerDiscreteScheduler", "FusedEulerAncestralDiscreteScheduler"]

logger = logging.getLogger("diffusers.schedulers.scheduling_euler_discrete")

_INT_TIMESTEP = (
    "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `EulerDiscreteScheduler.step()` is not"
    " supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _prediction(sched) -> int:
    p = sched.config.prediction_type
    return V.PREDICTION_TYPES["sample" if p == "original_sample" else p]


def _out_dtypes(model_output: torch.Tensor):
    """Stock Euler upcasts the sample to float32 and casts the result to the model
    output's dtype; its x0 keeps the float32 (or wider) dtype."""
    return model_output.dtype, torch.promote_types(torch.float32, model_output.dtype)


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _KarrasVEMixin(B.IndexedSchedulerMixin):
    """The VE-state schedulers (Euler, Euler ancestral, Heun): sigma tables, the model
    input scaling x / sqrt(sigma^2 + 1) and add_noise x0 + sigma z."""

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = self.sigmas.detach().to("cpu", torch.float32)
        scale = (sig**2 + 1) ** 0.5  # float32, as stock forms it
        return B._State(**tabs, scale_host=scale.tolist(), scale_dev=B.const_tensor(scale, device, torch.float32))

    def scale_model_input(self, sample, timestep):
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        self.is_scale_input_called = True
        if i is not None:
            return sample / st.scale_host[i]
        idx, valid = self._dk_positions(timestep, sample, st)
        c = _per_sample(self._dk_take(st.scale_dev, idx, valid), sample)
        return (sample.float() / c).to(sample.dtype) if sample.dtype in (torch.float16, torch.bfloat16) else sample / c

    def add_noise(self, original_samples, noise, timesteps):
        """Stock's ``x0 + sigma z`` (per-sample sigma from the timesteps' positions, on the
        device: no host read)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        if self.begin_index is None:
            idx, valid = self._dk_positions(timesteps, x0, st, last=False)
            sigma = self._dk_take(st.sig_dev, idx, valid)
        else:
            i = self.step_index if self.step_index is not None else self.begin_index
            sigma = st.sig_host[i]
        # x0 + sigma z is a flow step from 0 to sigma with velocity z
        return U.flow_step(x0, z, 0.0, sigma, False)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


class FusedEulerDiscreteScheduler(_KarrasVEMixin, EulerDiscreteScheduler):
    """:class:`diffusers.EulerDiscreteScheduler` with a fused ``step`` (see
    :mod:`diffkern.integrations.diffusers`).

    Every sigma option (``use_karras_sigmas``, exponential / beta sigmas,
    ``interpolation_type``, ``final_sigmas_type``, ``timestep_type``, custom ``sigmas`` /
    ``timesteps``) only shapes ``self.sigmas`` in stock's ``set_timesteps`` and is
    supported as is. Churn (``s_churn > 0``) is diffusers' own (noise added after the
    model ran); its noise with a generator is drawn by diffusers' ``randn_tensor`` (stock's
    numbers), and churn needs a scalar timestep outside torch.compile.
    ``pred_original_sample`` is one more fused pass (two with churn).
    """

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, or `v_prediction`")

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True,
             variance_noise=None):
        """EulerDiscreteScheduler.step, fused; ``timestep`` may be a (B,) tensor;
        ``variance_noise`` is the churn noise (used only when ``s_churn > 0``)."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP)
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        st = self._dk_state(sample.device)
        pred = _prediction(self)
        prev_dtype, x0_dtype = _out_dtypes(model_output)
        i = self._dk_host_index(timestep, st)
        if i is not None:
            sigma, sigma_next = st.sig_host[i], st.sig_host[i + 1]
            gamma = min(s_churn / (len(st.sig_host) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        else:
            if s_churn > 0:
                raise NotImplementedError("s_churn > 0 needs a scalar timestep outside torch.compile (the churn "
                                          "decision s_tmin <= sigma <= s_tmax is taken on the host)")
            idx, valid = self._dk_positions(timestep, sample, st)
            sigma, sigma_next = self._dk_take(st.sig_dev, idx, valid), self._dk_take(st.sig_dev, idx + 1, valid)
            gamma = 0.0
        x, m = sample, model_output
        if gamma > 0:
            # churn noise: stock's numbers whatever the mode (diffusers' own step, not a fused draw)
            z = variance_noise
            if z is None:
                randn = sys.modules[EulerDiscreteScheduler.__module__].randn_tensor
                z = randn(m.shape, dtype=m.dtype, device=m.device, generator=generator)
            z, _ = B.noise_args(x, None, z, True)
            prev = U.euler_step(x, m, sigma, sigma_next, 0.0, float(s_noise), gamma, pred, z)
            sigma_hat = sigma * (gamma + 1)
            x_hat = U.flow_step(x, z, 0.0, s_noise * sigma * math.sqrt(gamma * (gamma + 2)), False)
            x0_sigma = sigma if pred == V.PREDICTION_TYPES["v_prediction"] else sigma_hat
            x0 = B.denoised(x_hat, m, x0_sigma, pred)
        else:
            prev = U.euler_step(x, m, sigma, sigma_next, 0.0, 1.0, 0.0, pred)
            x0 = model_output if pred == V.PREDICTION_TYPES["sample"] else B.denoised(x, m, sigma, pred)
        prev = _cast(prev, prev_dtype)
        if pred != V.PREDICTION_TYPES["sample"]:
            x0 = _cast(x0, x0_dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(EulerDiscreteSchedulerOutput, prev, x0)


class FusedEulerAncestralDiscreteScheduler(_KarrasVEMixin, EulerAncestralDiscreteScheduler):
    """:class:`diffusers.EulerAncestralDiscreteScheduler` with a fused ``step`` (eta = 1,
    s_noise = 1, as stock); ``variance_noise=`` gives the noise. Not supported:
    ``prediction_type="sample"`` (stock raises NotImplementedError for it at the first step;
    here at construction)."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p == "sample":
            raise B.unsupported(self, "prediction_type", p, "stock EulerAncestralDiscreteScheduler does not "
                                "implement it either")
        if p not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, or `v_prediction`")

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        """EulerAncestralDiscreteScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(_INT_TIMESTEP)
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to ensure correct "
                           "denoising. See `StableDiffusionPipeline` for a usage example.")
        st = self._dk_state(sample.device)
        pred = _prediction(self)
        prev_dtype, x0_dtype = _out_dtypes(model_output)
        i = self._dk_host_index(timestep, st)
        if i is not None:
            sigma, sigma_next = st.sig_host[i], st.sig_host[i + 1]
        else:
            idx, valid = self._dk_positions(timestep, sample, st)
            sigma, sigma_next = self._dk_take(st.sig_dev, idx, valid), self._dk_take(st.sig_dev, idx + 1, valid)
        x, m = sample, model_output
        noise, gen = B.step_noise(self, x, generator, variance_noise, True, dtype=m.dtype)
        prev = _cast(U.euler_step(x, m, sigma, sigma_next, 1.0, 1.0, 0.0, pred, noise, gen), prev_dtype)
        x0 = _cast(B.denoised(x, m, sigma, pred), x0_dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(EulerAncestralDiscreteSchedulerOutput, prev, x0)
