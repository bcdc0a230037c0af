"""FusedDDIMScheduler: DDIMScheduler with dk.ddim_step."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ... import _validate as V
from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDDIMScheduler"]


class FusedDDIMScheduler(B.FusedSchedulerMixin, DDIMScheduler):
    """:class:`diffusers.DDIMScheduler` whose ``step`` and ``add_noise`` are diffkern's
    fused ops (see :mod:`diffkern.integrations.diffusers` for what is the same and what
    is not).

    As stock, the step goes from ``t`` to ``t - num_train_timesteps // num_inference_steps``
    whatever the spacing, with ``alphas_cumprod' = 1`` (``set_alpha_to_one``) or
    ``alphas_cumprod[0]`` below 0. ``pred_original_sample`` is a second fused pass.

    ``thresholding=True``: stock's quantile pass on the fused x0, then the step with
    stock's unthresholded epsilon (see ``_dk_thresholded``): two passes more.
    """

    def _dk_check_config(self):
        c = self.config
        if c.clip_sample and not c.thresholding and not c.clip_sample_range > 0:
            raise B.unsupported(self, "clip_sample_range", c.clip_sample_range, "the fused clip needs a range > 0")
        if c.prediction_type not in V.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, `sample`, or"
                             " `v_prediction`")

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device=device)
        self._dk_reset(prebuild=(self.timesteps.device,))

    def _dk_build(self, device):
        # The kernels take t_prev < t, with t_prev < 0 reading alphas_cumprod' = 1. Stock
        # reads final_alpha_cumprod below 0, which is alphas_cumprod[0] without
        # set_alpha_to_one: at t = 0 that is a step from t to itself. So the step runs on a
        # table shifted by one, ext[t + 1] = alphas_cumprod[t], ext[0] = final_alpha_cumprod,
        # and every t_prev < 0 becomes index 0 (t_prev + 1 < t + 1 always).
        c = self.config
        N = c.num_train_timesteps
        jump = N // self.num_inference_steps if self.num_inference_steps else 1  # (add_noise needs no schedule)
        ac = self.alphas_cumprod.to("cpu", torch.float32)
        final = torch.ones(1) if c.set_alpha_to_one else ac[:1]
        ext = torch.cat([final, ac])
        prev = (torch.arange(N, dtype=torch.int64) - jump).clamp_min(-1) + 1  # shifted
        ts = self.timesteps.to("cpu", torch.int64)
        tp = prev[ts.clamp(0, N - 1)]
        return B._State(
            table=B.const_tensor(ac, device, torch.float32),
            table_ext=B.const_tensor(ext, device, torch.float32),
            prev=B.const_tensor(prev, device, torch.int64),
            prev_host=prev.tolist(),
            t_steps=B.per_step(B.const_tensor(ts + 1, device, torch.int64)),
            tp_steps=B.per_step(B.const_tensor(tp, device, torch.int64)),
            prediction=V.PREDICTION_TYPES[c.prediction_type],
            clip=float(c.clip_sample_range) if c.clip_sample and not c.thresholding else None,
            threshold=bool(c.thresholding),
        )

    def _dk_pair(self, timestep, x, st):
        """(t + 1, t_prev + 1) for the shifted table."""
        i = self._dk_index_of(timestep)
        if i is not None:  # the per-step tensors live on x.device, whatever device timesteps are on
            return st.t_steps[i], st.tp_steps[i]
        ti = B.int_timestep(timestep)
        if ti is not None:
            if not 0 <= ti < self.config.num_train_timesteps:
                raise IndexError(f"timestep {ti} is outside [0, {self.config.num_train_timesteps})")
            return V._int_timestep_tensor(ti + 1, x.device), V._int_timestep_tensor(st.prev_host[ti], x.device)
        t = B.timestep_tensor(timestep, x)
        return t + 1, st.prev.index_select(0, t)

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        """DDIMScheduler.step, fused; ``timestep`` may also be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        x, m = B.promote(sample, model_output)
        st = self._dk_state(x.device)
        t, tp = self._dk_pair(timestep, x, st)
        eta = float(eta)
        noise, gen = B.step_noise(self, x, generator, variance_noise, eta > 0, dtype=m.dtype)
        x0 = B.pred_x0(x, m, t, st, st.prediction, st.clip, table=st.table_ext)
        if st.threshold:
            return self._dk_thresholded(x, m, x0, t, tp, st, eta, use_clipped_model_output, noise, gen, return_dict)
        if use_clipped_model_output and st.clip is not None:
            # eps re-derived from the clipped x0 (Glide): a DDIM step on x0 as a "sample" prediction
            prev = U.ddim_step(x, x0, t, tp, st.table_ext, eta, V.PREDICTION_TYPES["sample"], None, noise, gen)
        else:
            prev = U.ddim_step(x, m, t, tp, st.table_ext, eta, st.prediction, st.clip, noise, gen)
        if not return_dict:
            return (prev, x0)
        return B.output(DDIMSchedulerOutput, prev, x0)

    def _dk_thresholded(self, x, m, x0, t, tp, st, eta, use_clipped, noise, gen, return_dict):
        """Dynamic thresholding. The per-sample quantile is stock's ``_threshold_sample``
        (device ops, no host read). The fused op clamps to one scalar range, not to a bound
        per sample, so the thresholded x0 enters the step as a correction instead: the DDIM
        step is sqrt(a') x0 + c eps + std z with stock's unthresholded eps, hence
        prev = step(x, m) + sqrt(a') (x0_thr - x0), whose rounding is that of sqrt(a') x0
        (no division by sqrt(1 - a), which re-deriving eps from x would bring)."""
        x0t = self._threshold_sample(x0)
        if use_clipped:  # eps re-derived from the thresholded x0, as stock
            prev = U.ddim_step(x, x0t, t, tp, st.table_ext, eta, V.PREDICTION_TYPES["sample"], None, noise, gen)
        else:
            prev = U.ddim_step(x, m, t, tp, st.table_ext, eta, st.prediction, None, noise, gen)
            shape = (-1,) + (1,) * (x.dim() - 1)
            prev = prev + st.table_ext.index_select(0, tp).sqrt().reshape(shape).to(prev.dtype) * (x0t - x0)
        if not return_dict:
            return (prev, x0t)
        return B.output(DDIMSchedulerOutput, prev, x0t)

    def add_noise(self, original_samples, noise, timesteps):
        """DDIMScheduler.add_noise (dk.q_sample, coefficients in float32)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        return U.q_sample(x0, B.timestep_tensor(timesteps, x0), st.table, z)[0]
