"""FusedDPMSolverMultistepScheduler: DPMSolverMultistepScheduler (dpmsolver++, orders
1-2, both solver types) with dk.dpmpp_2m_step."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import _validate as V
from . import _base as B

__all__ = ["FusedDPMSolverMultistepScheduler"]

_SAMPLE = V.PREDICTION_TYPES["sample"]


class FusedDPMSolverMultistepScheduler(B.IndexedSchedulerMixin, DPMSolverMultistepScheduler):
    """:class:`diffusers.DPMSolverMultistepScheduler` with one fused pass per step
    (``dk.dpmpp_2m_step`` on the VP state, which also writes the step's x0 for the next
    step's history). The order logic (warm-up, ``lower_order_final``, ``euler_at_final``,
    ``final_sigmas_type``) and every sigma option (Karras / exponential / beta / Lu
    lambdas, ``lambda_min_clipped``, spacings) are stock's. ``thresholding`` runs stock's
    quantile pass on the fused x0, then the step on the thresholded x0. The history
    holds x0 in the promoted dtype (stock: the model dtype).

    Not supported (``NotImplementedError`` at construction): ``algorithm_type`` other than
    ``"dpmsolver++"`` (the SDE and the deprecated noise-space variants), ``solver_order=3``,
    ``use_flow_sigmas`` / ``prediction_type="flow_prediction"`` (a different state). A (B,)
    timestep (or torch.compile) needs ``final_sigmas_type="zero"`` or a last step of the same
    order as the others (the order is shared by the batch).
    """

    _dk_first_match_second = True

    def _dk_check_config(self):
        c = self.config
        if c.algorithm_type != "dpmsolver++":
            raise B.unsupported(self, "algorithm_type", c.algorithm_type, "the fused step is DPM-Solver++(2M)")
        if c.solver_order not in (1, 2):
            raise B.unsupported(self, "solver_order", c.solver_order, "the fused step has orders 1 and 2")
        if c.use_flow_sigmas or c.prediction_type == "flow_prediction":
            raise B.unsupported(self, "use_flow_sigmas" if c.use_flow_sigmas else "prediction_type",
                                True if c.use_flow_sigmas else c.prediction_type, "flow-matching state")
        if c.prediction_type not in V.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, `sample`, "
                             "`v_prediction`, or `flow_prediction` for the DPMSolverMultistepScheduler.")

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = self.sigmas.detach().to("cpu", torch.float32)
        alpha = 1 / ((sig.double() ** 2 + 1) ** 0.5)
        return B._State(**tabs, alpha_dev=B.const_tensor(alpha.float(), device, torch.float32),
                        sigvp_dev=B.const_tensor((sig.double() * alpha).float(), device, torch.float32))

    def _dk_last_order_shared(self) -> bool:
        c = self.config
        n = len(self.timesteps)
        return c.final_sigmas_type == "zero" or not (c.euler_at_final or (c.lower_order_final and n < 15))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        """DPMSolverMultistepScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        pred = V.PREDICTION_TYPES[c.prediction_type]
        m = model_output
        if pred == V.PREDICTION_TYPES["epsilon"] and c.variance_type in ("learned", "learned_range"):
            m = m[:, :3]
        n = len(self.timesteps)
        i = self._dk_host_index(timestep, st)
        if i is not None:
            sigma, sigma_next = st.sig_host[i], st.sig_host[i + 1]
            sigma_prev = st.sig_host[i - 1] if i > 0 else None
            lower_order_final = (i == n - 1) and (c.euler_at_final or (c.lower_order_final and n < 15)
                                                  or c.final_sigmas_type == "zero")
        else:
            if not self._dk_last_order_shared():
                raise NotImplementedError(
                    "per-sample timesteps (or torch.compile) with final_sigmas_type='sigma_min' and a first-order "
                    "last step: the batch would need two orders in one step")
            idx, valid = self._dk_positions(timestep, sample, st)
            sigma, sigma_next = self._dk_take(st.sig_dev, idx, valid), self._dk_take(st.sig_dev, idx + 1, valid)
            sigma_prev = self._dk_take(st.sig_dev, (idx - 1).clamp_min(0), valid)
            lower_order_final = False  # the last step goes to sigma 0, where both orders give x0
        second = not (c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final)
        old = self.model_outputs[-1] if second else None
        if c.thresholding:
            x0 = self._threshold_sample(B.denoised(sample, m, sigma, pred, vp=True))
            prev = B.dpmpp_2m(sample, x0, old, sigma, sigma_next, sigma_prev, _SAMPLE, c.solver_type, True, False)
        else:
            prev, x0 = B.dpmpp_2m(sample, m, old, sigma, sigma_next, sigma_prev, pred, c.solver_type, True, True)
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)  # stock: its x0's dtype
        if prev.dtype != out_dtype:
            prev = prev.to(out_dtype)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples, noise, timesteps):
        """Stock's ``alpha_t x0 + sigma_t z`` (VP), per-sample coefficients found on the device."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        if self.begin_index is None:
            idx, valid = self._dk_positions(timesteps, x0, st)
            idx = torch.where(valid, idx, torch.full_like(idx, st.n - 1))  # stock: no match -> the last step
            valid = torch.ones_like(valid)
        else:
            i = self.step_index if self.step_index is not None else self.begin_index
            idx = torch.full((1,), i, dtype=torch.int64, device=x0.device)
            valid = torch.ones(1, dtype=torch.bool, device=x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self._dk_take(st.alpha_dev, idx, valid).reshape(shape).to(x0.dtype)
        s = self._dk_take(st.sigvp_dev, idx, valid).reshape(shape).to(x0.dtype)
        return torch.addcmul(a * x0, s, z)
