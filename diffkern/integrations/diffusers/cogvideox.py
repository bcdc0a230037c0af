"""FusedCogVideoXDDIMScheduler: CogVideoXDDIMScheduler with its step one dk.linear_step pass."""

from __future__ import annotations

import math

import torch
from diffusers import CogVideoXDDIMScheduler
from diffusers.schedulers.scheduling_ddim_cogvideox import DDIMSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedCogVideoXDDIMScheduler"]


class FusedCogVideoXDDIMScheduler(B.FusedSchedulerMixin, CogVideoXDDIMScheduler):
    """:class:`diffusers.CogVideoXDDIMScheduler` with one fused pass per step.

    Stock's step (deterministic DDIM on the SNR-shifted schedule; ``eta``, ``generator``,
    ``variance_noise``, ``use_clipped_model_output`` and ``clip_sample`` are accepted and
    unused, as on stock) is ``prev = a x + b x0`` with ``x0`` linear in (sample, model
    output), so ``prev`` and ``pred_original_sample`` are the two outputs of one
    ``linear_step`` call. The coefficients are formed in float64 on the host for each
    train timestep in ``set_timesteps``; an int timestep or an element of
    ``self.timesteps`` reads them from the host table (no read of a tensor), any other
    timestep tensor, (B,) included, from the same table on its device (one coefficient
    row per sample, no host sync). ``add_noise`` / ``get_velocity`` are stock's.
    """

    def _dk_check_config(self):
        pass  # stock raises for an unknown prediction_type at step, and so does this class

    def _dk_coeffs(self, t: int, ac, final, jump):
        """[[prev row], [x0 row]] over (sample, model output) at train timestep t."""
        a_t = ac[t]
        tp = t - jump
        a_p = ac[tp] if tp >= 0 else final
        b_t = 1 - a_t
        p = self.config.prediction_type
        if p == "epsilon":
            cx, cm = 1 / math.sqrt(a_t) if a_t > 0 else math.inf, -math.sqrt(b_t) / math.sqrt(a_t) if a_t > 0 \
                else -math.inf
        elif p == "sample":
            cx, cm = 0.0, 1.0
        elif p == "v_prediction":
            cx, cm = math.sqrt(a_t), -math.sqrt(b_t)
        else:
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, or `v_prediction`")
        a = math.sqrt((1 - a_p) / b_t) if b_t > 0 else math.inf
        b = math.sqrt(a_p) - math.sqrt(a_t) * a
        return [[a + b * cx, b * cm], [cx, cm]]

    def _dk_build(self, device):
        if not self.num_inference_steps:
            return B._State(host=None, dev=None, ts_host=None)
        N = self.config.num_train_timesteps
        jump = N // self.num_inference_steps
        ac = self.alphas_cumprod.detach().to("cpu", torch.float64).tolist()
        final = float(self.final_alpha_cumprod)
        if self.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
            host = None  # step raises stock's ValueError
        else:
            host = [self._dk_coeffs(t, ac, final, jump) for t in range(len(ac))]
        dev = None if host is None else B.const_tensor(host, device, torch.float64)  # (N, 2, 2)
        return B._State(host=host, dev=dev, ts_host=self.timesteps.detach().to("cpu").tolist())

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        """CogVideoXDDIMScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        st = self._dk_state(sample.device)
        if st.host is None:
            self._dk_coeffs(0, [0.5], 0.5, 0)  # raises stock's ValueError
        x, m = B.promote(sample, model_output)
        sample_pred = self.config.prediction_type == "sample"
        i = self._dk_index_of(timestep)
        t = st.ts_host[i] if i is not None else B.int_timestep(timestep)
        if t is None and isinstance(timestep, torch.Tensor) and timestep.dim() == 0 and timestep.device.type == "cpu" \
                and not B.compiling():
            t = int(timestep)  # a CPU scalar: read on the host, no device sync
        if t is not None:
            rows = st.host[t]
            coeffs = rows[:1] if sample_pred else rows
        else:
            tt = B.timestep_tensor(timestep, x)
            coeffs = st.dev.index_select(0, tt)
            if sample_pred:
                coeffs = coeffs[:, :1].contiguous()
        outs = U.linear_step([x, m], coeffs)
        prev = outs[0]
        x0 = model_output if sample_pred else outs[1]
        if not return_dict:
            return (prev, x0)
        return B.output(DDIMSchedulerOutput, prev, x0)
