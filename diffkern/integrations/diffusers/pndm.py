"""FusedPNDMScheduler: PNDMScheduler (PRK warm-up and PLMS) with each step one
dk.linear_step pass."""

from __future__ import annotations

import math

import torch
from diffusers import PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedPNDMScheduler"]

_PRK_WEIGHTS = {0: 1 / 6, 1: 1 / 3, 2: 1 / 3}
_NO_STEPS = "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"


class FusedPNDMScheduler(B.FusedSchedulerMixin, PNDMScheduler):
    """:class:`diffusers.PNDMScheduler` with one fused pass per step.

    Stock's step is ``_get_prev_sample`` applied to a fixed combination of the current
    and stored model outputs (the Runge-Kutta stage weights 1/6, 1/3, 1/3, 1/6 during the
    PRK warm-up, the Adams-Bashforth weights of orders 1-4 in PLMS), so the step is one
    ``linear_step`` call over (sample, model output, stored outputs) whose coefficients
    are formed in float64 on the host from the timestep's host value. ``counter``,
    ``ets`` and ``cur_sample`` are kept as stock keeps them, and ``step_prk`` /
    ``step_plms`` can be called directly as on stock. The PRK stage outputs are kept
    (not summed into ``cur_model_output``, which stays 0) until the stage that uses them.
    ``add_noise`` is stock's.

    The timestep's value is read on the host: an int, or an element of ``self.timesteps``
    (found from the view, no read); another tensor is read (stock reads every one). A
    (B,) timestep is not supported (``NotImplementedError``).
    """

    def _dk_check_config(self):
        pass  # every config: stock raises for an unknown prediction_type at step, and so does this class

    def _dk_build(self, device):
        ac = self.alphas_cumprod.detach().to("cpu", torch.float64)
        return B._State(ac=ac.tolist(), final=float(self.final_alpha_cumprod),
                        ts_host=self.timesteps.detach().to("cpu").tolist())

    def _dk_t(self, timestep, st) -> int:
        i = self._dk_index_of(timestep)
        if i is not None:
            return st.ts_host[i]
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise NotImplementedError(f"{type(self).__name__}.step takes one timestep for the whole batch (the "
                                          "multistep history is shared by the batch)")
            return int(timestep)  # stock reads it too
        return int(timestep)

    def _dk_prev(self, st, t, tp):
        """(sample coefficient, model-output coefficient) of stock's _get_prev_sample."""
        a_t = st.ac[t]
        a_p = st.ac[tp] if tp >= 0 else st.final
        b_t, b_p = 1 - a_t, 1 - a_p
        cs = math.sqrt(a_p / a_t)
        cm = -(a_p - a_t) / (a_t * math.sqrt(b_p) + math.sqrt(a_t * b_t * a_p))
        p = self.config.prediction_type
        if p == "v_prediction":
            return cs + cm * math.sqrt(b_t), cm * math.sqrt(a_t)
        if p != "epsilon":
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon` or `v_prediction`")
        return cs, cm

    @staticmethod
    def _dk_pass(sample, terms, cs, cm):
        """cs * sample + cm * sum(w * m for w, m in terms), one fused pass (a tensor given
        twice is one input)."""
        inputs, coeffs = [sample], [cs]
        for w, m in terms:
            for j, t in enumerate(inputs):
                if t is m:
                    coeffs[j] += cm * w
                    break
            else:
                inputs.append(m)
                coeffs.append(cm * w)
        dt = inputs[0].dtype
        for t in inputs[1:]:
            dt = torch.promote_types(dt, t.dtype)
        inputs = [t if t.dtype == dt else t.to(dt) for t in inputs]
        return U.linear_step(inputs, [coeffs])[0]

    def step_prk(self, model_output, timestep, sample, return_dict: bool = True):
        """PNDMScheduler.step_prk, fused."""
        if self.num_inference_steps is None:
            raise ValueError(_NO_STEPS)
        st = self._dk_state(sample.device)
        t_in = self._dk_t(timestep, st)
        c = self.counter
        diff_to_prev = 0 if c % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = t_in - diff_to_prev
        t = int(self.prk_timesteps[c // 4 * 4])
        r = c % 4
        # stock sums the stages into cur_model_output as they come (1/6, 1/3, 1/3 of
        # stages 0-2, reset after stage 3); they are kept here until stage 3 uses them
        stages = self.__dict__.setdefault("_dk_stages", {})
        if r == 0:
            stages.clear()
            self.ets.append(model_output)
            self.cur_sample = sample
        if r == 3:
            terms = [(_PRK_WEIGHTS[k], v) for k, v in sorted(stages.items())] + [(1 / 6, model_output)]
            stages.clear()
        else:
            stages[r] = model_output
            terms = [(1.0, model_output)]
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        cs, cm = self._dk_prev(st, t, prev_timestep)
        prev_sample = self._dk_pass(cur_sample, terms, cs, cm)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return B.output(SchedulerOutput, prev_sample)

    def step_plms(self, model_output, timestep, sample, return_dict: bool = True):
        """PNDMScheduler.step_plms, fused."""
        if self.num_inference_steps is None:
            raise ValueError(_NO_STEPS)
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{self.__class__} can only be run AFTER scheduler has been run "
                "in 'prk' mode for at least 12 iterations "
                "See: https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/pipeline_pndm.py "
                "for more information.")
        st = self._dk_state(sample.device)
        t = self._dk_t(timestep, st)
        jump = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = t - jump
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = t
            t = t + jump
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            terms = [(1.0, model_output)]
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            terms = [(0.5, model_output), (0.5, e[-1])]
            sample = self.cur_sample
            self.cur_sample = None
        elif len(e) == 2:
            terms = [(1.5, e[-1]), (-0.5, e[-2])]
        elif len(e) == 3:
            terms = [(23 / 12, e[-1]), (-16 / 12, e[-2]), (5 / 12, e[-3])]
        else:
            terms = [(55 / 24, e[-1]), (-59 / 24, e[-2]), (37 / 24, e[-3]), (-9 / 24, e[-4])]
        cs, cm = self._dk_prev(st, t, prev_timestep)
        prev_sample = self._dk_pass(sample, terms, cs, cm)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return B.output(SchedulerOutput, prev_sample)
