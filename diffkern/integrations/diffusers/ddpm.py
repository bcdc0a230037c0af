"""FusedDDPMScheduler: DDPMScheduler with dk.ddpm_step."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from ... import _validate as V
from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDDPMScheduler"]

# fixed_small_log's std is exp(0.5 log v) = sqrt(v): fixed_small up to rounding. The
# learned types run the kernel's fixed_small step on noise rescaled per element by
# std_learned / std_fixed_small (see _learned_noise).
_VARIANCES = {"fixed_small": 0, "fixed_small_log": 0, "fixed_large": 1, "learned": 0, "learned_range": 0}
_LEARNED = ("learned", "learned_range")


class FusedDDPMScheduler(B.FusedSchedulerMixin, DDPMScheduler):
    """:class:`diffusers.DDPMScheduler` whose ``step`` and ``add_noise`` are diffkern's
    fused ops (see :mod:`diffkern.integrations.diffusers`).

    As stock, a step goes from ``t`` to the next entry of ``timesteps`` (``t - 1``
    before ``set_timesteps``; any other ``t`` also steps to ``t - 1``, where stock raises),
    adding noise only where ``t > 0``. ``step`` also takes ``variance_noise=`` (stock
    DDPM has none). ``thresholding=True`` works (the quantile pass is stock's, then the
    step runs on the thresholded x0).

    ``variance_type`` ``"learned"`` / ``"learned_range"``: the model output's second half
    of channels is the variance (as stock); the step is the fixed_small one on noise
    rescaled per element, which always holds stock's numbers (``dk_noise="kernel"`` too).
    Not supported (``NotImplementedError``): ``"fixed_large_log"`` (stock takes the square
    root of ``log(beta) < 0``: NaN).
    """

    def _dk_check_config(self):
        c = self.config
        if c.variance_type == "fixed_large_log":
            raise B.unsupported(self, "variance_type", c.variance_type,
                                "stock computes sqrt(log(beta)), which is NaN")
        if c.clip_sample and not c.thresholding and not c.clip_sample_range > 0:
            raise B.unsupported(self, "clip_sample_range", c.clip_sample_range, "the fused clip needs a range > 0")
        if c.prediction_type not in V.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, `sample` or"
                             " `v_prediction`  for the DDPMScheduler.")

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        self._dk_reset(prebuild=(self.timesteps.device,))

    def _dk_build(self, device):
        c = self.config
        N = c.num_train_timesteps
        ts = self.timesteps.to("cpu", torch.int64)
        prev = torch.arange(N, dtype=torch.int64) - 1
        if self.custom_timesteps or self.num_inference_steps:
            nxt = torch.cat([ts[1:], torch.tensor([-1])])
            for i in range(ts.numel() - 1, -1, -1):  # the first match wins, as stock's nonzero()[0]
                if 0 <= ts[i] < N:
                    prev[ts[i]] = nxt[i]
        else:
            nxt = ts - 1
        return B._State(
            table=B.const_tensor(self.alphas_cumprod, device, torch.float32),
            prev=B.const_tensor(prev, device, torch.int64),
            prev_host=prev.tolist(), ts_host=ts.tolist(),
            t_steps=B.per_step(B.const_tensor(ts, device, torch.int64)),
            tp_steps=B.per_step(B.const_tensor(nxt, device, torch.int64)),
            prediction=V.PREDICTION_TYPES[c.prediction_type],
            # any other name: stock's _get_variance falls through to fixed_small's variance
            variance=_VARIANCES.get(c.variance_type, 0),
            clip=float(c.clip_sample_range) if c.clip_sample and not c.thresholding else None,
            threshold=bool(c.thresholding),
        )

    def _dk_pair(self, timestep, x, st):
        """(t, t_prev, t on the host or None)."""
        i = self._dk_index_of(timestep)
        if i is not None:  # the per-step tensors live on x.device, whatever device timesteps are on
            return st.t_steps[i], st.tp_steps[i], st.ts_host[i]
        ti = B.int_timestep(timestep)
        if ti is not None:
            if not 0 <= ti < self.config.num_train_timesteps:
                raise IndexError(f"timestep {ti} is outside [0, {self.config.num_train_timesteps})")
            return V._int_timestep_tensor(ti, x.device), V._int_timestep_tensor(st.prev_host[ti], x.device), ti
        t = B.timestep_tensor(timestep, x)
        return t, st.prev.index_select(0, t), None

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        """DDPMScheduler.step, fused; ``timestep`` may also be a (B,) tensor, and
        ``variance_noise`` gives the noise to add (shape of the sample)."""
        learned = self.config.variance_type in _LEARNED
        pv = None
        if learned:
            if model_output.shape[1] != sample.shape[1] * 2:
                raise ValueError(f"variance_type={self.config.variance_type!r} needs a model output with twice the "
                                 "sample's channels (the prediction, then the variance)")
            model_output, pv = torch.split(model_output, sample.shape[1], dim=1)
        x, m = B.promote(sample, model_output)
        st = self._dk_state(x.device)
        t, tp, t_host = self._dk_pair(timestep, x, st)
        # Stock draws only where t > 0 (the kernel's std is 0 there): a generator list is
        # then not consumed, as stock's is not. A timestep tensor that is not one of
        # self.timesteps is not read (no host sync): the step draws, and its noise is
        # multiplied by 0 if t was 0 (the image is stock's; the generator is one draw further).
        draws = t_host != 0 or variance_noise is not None
        if self.noise_mode == "kernel" and not learned:
            noise, gen = B.noise_args(x, generator, variance_noise, draws)
            if not draws and isinstance(generator, torch.Generator):
                gen = generator
        else:
            # (learned variances need the noise as a tensor: stock's numbers in "kernel" mode too)
            noise, gen = B.step_noise(self, x, generator, variance_noise, draws, dtype=m.dtype, tensor=learned)
            if learned and noise is not None:
                noise = self._learned_noise(st, t, tp, pv, noise)
            if not draws:
                # std is 0 at t = 0: the step is x0 (its coefficients are exactly 1 and 0, in
                # stock's float32 too), with no draw from any generator
                x0 = B.pred_x0(x, m, t, st, st.prediction, st.clip) if not st.threshold else \
                    self._threshold_sample(B.pred_x0(x, m, t, st, st.prediction, None))
                prev = x0.clone()
                return B.output(DDPMSchedulerOutput, prev, x0) if return_dict else (prev, x0)
        if st.threshold:
            x0 = self._threshold_sample(B.pred_x0(x, m, t, st, st.prediction, None))
            prev = U.ddpm_step(x, x0, t, tp, st.table, st.variance, V.PREDICTION_TYPES["sample"], None, noise, gen)
        else:
            x0 = B.pred_x0(x, m, t, st, st.prediction, st.clip)
            prev = U.ddpm_step(x, m, t, tp, st.table, st.variance, st.prediction, st.clip, noise, gen)
        if not return_dict:
            return (prev, x0)
        return B.output(DDPMSchedulerOutput, prev, x0)

    def _learned_noise(self, st, t, tp, pv, z):
        """z * std_learned / std_fixed_small: the kernel's fixed_small step then adds
        std_learned * z (to rounding). Stock's formulas, on the device (no host read):
        learned: var = pv; learned_range: log var = f log(beta_t) + (1 - f) log(var_small),
        f = (pv + 1) / 2."""
        ac = st.table
        a_t = ac.index_select(0, t)
        a_prev = torch.where(tp >= 0, ac.index_select(0, tp.clamp_min(0)), torch.ones_like(a_t))
        beta_t = 1 - a_t / a_prev
        var_small = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        shape = (-1,) + (1,) * (z.dim() - 1)
        var_small, beta_t = var_small.reshape(shape), beta_t.reshape(shape)
        pv = pv.to(torch.float32)
        if self.config.variance_type == "learned":
            std = pv ** 0.5
        else:
            frac = (pv + 1) / 2
            std = torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(var_small)))
        return (z * (std / var_small.sqrt())).to(z.dtype)

    def add_noise(self, original_samples, noise, timesteps):
        """DDPMScheduler.add_noise (dk.q_sample, coefficients in float32)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        return U.q_sample(x0, B.timestep_tensor(timesteps, x0), st.table, z)[0]
