"""FusedHeunDiscreteScheduler: HeunDiscreteScheduler with dk.euler_step / dk.heun_step."""

from __future__ import annotations

from diffusers import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

from ... import _validate as V
from ... import unchecked as U
from . import _base as B
from .euler import _KarrasVEMixin

__all__ = ["FusedHeunDiscreteScheduler"]

_SAMPLE = V.PREDICTION_TYPES["sample"]


class FusedHeunDiscreteScheduler(_KarrasVEMixin, HeunDiscreteScheduler):
    """:class:`diffusers.HeunDiscreteScheduler` with fused steps: the first call of each
    pair is an Euler step (``dk.euler_step``), the second Heun's correction
    (``dk.heun_step``, which re-forms the first slope from the first call's sample and
    model output: nothing is stored but references). With ``clip_sample`` the clipped x0
    (the ``pred_original_sample`` pass, clamped) is what the steps read. As stock, the math
    runs in the inputs' dtype (float32 for float16/bfloat16 storage here).

    A (B,) timestep is looked up per sample (timesteps hold each t twice, at the second-stage
    position then the first-stage one: the last occurrence in the first stage, the first
    in the second); all samples share the stage."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in V.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, or `v_prediction`")
        if self.config.clip_sample and not self.config.clip_sample_range > 0:
            raise B.unsupported(self, "clip_sample_range", self.config.clip_sample_range, "needs a range > 0")

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """HeunDiscreteScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        st = self._dk_state(sample.device)
        pred = V.PREDICTION_TYPES[self.config.prediction_type]
        first = self.state_in_first_order
        i = self._dk_host_index(timestep, st)
        if i is not None:
            sigma, sigma_next = (st.sig_host[i], st.sig_host[i + 1]) if first else (st.sig_host[i - 1], st.sig_host[i])
        else:
            idx, valid = self._dk_positions(timestep, sample, st, last=first)
            lo = idx if first else idx - 1
            sigma, sigma_next = self._dk_take(st.sig_dev, lo, valid), self._dk_take(st.sig_dev, lo + 1, valid)
        x, m = sample, model_output
        x0 = m if pred == _SAMPLE else B.denoised(x, m, sigma if first else sigma_next, pred)
        if self.config.clip_sample:
            r = float(self.config.clip_sample_range)
            x0 = x0.clamp(-r, r)
            m, pred = x0, _SAMPLE
        if first:
            prev = U.euler_step(x, m, sigma, sigma_next, 0.0, 1.0, 0.0, pred)
            self.dt = sigma_next - sigma  # stock's state flag (and value)
            self.sample = x
            self._dk_first = (m, pred, sigma)
        else:
            m1, pred1, sigma1 = self._dk_first
            prev = U.heun_step(self.sample, m1, x, m, sigma1, sigma_next, pred)
            self.prev_derivative = None
            self.dt = None
            self.sample = None
            self._dk_first = None
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(HeunDiscreteSchedulerOutput, prev, x0)
