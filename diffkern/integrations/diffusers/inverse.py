"""FusedDDIMInverseScheduler: DDIMInverseScheduler with one dk.linear_step per step."""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler
from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDDIMInverseScheduler"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _coeff_table(ac: torch.Tensor, initial: float, jump: int, prediction: str) -> torch.Tensor:
    """(N, 4, 2) float64: for each target timestep t, the rows over (x, m) of the step's
    prev, its x0 and its eps, then (sqrt(a_t), sqrt(1 - a_t)). The step goes from s = min(t - jump, N - 1) (alpha
    ``initial`` below 0) to t: prev = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with (x0, eps)
    linear in (x, m) by the prediction type."""
    ac = ac.double()
    N = ac.shape[0]
    t = torch.arange(N)
    s = (t - jump).clamp(max=N - 1)
    a = torch.where(s >= 0, ac[s.clamp(min=0)], torch.full_like(ac, initial))
    ap = ac[t]
    ra, rb = a.sqrt(), (1 - a).sqrt()
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if prediction == "epsilon":
        x0, eps = (1 / ra, -rb / ra), (zero, one)
    elif prediction == "sample":
        x0, eps = (zero, one), (1 / rb, -ra / rb)
    else:
        x0, eps = (ra, -rb), (rb, ra)
    rp, rq = ap.sqrt(), (1 - ap).sqrt()
    prev = (rp * x0[0] + rq * eps[0], rp * x0[1] + rq * eps[1])
    return torch.stack([torch.stack(prev, -1), torch.stack(x0, -1), torch.stack(eps, -1),
                        torch.stack([rp, rq], -1)], 1)


class FusedDDIMInverseScheduler(B.FusedSchedulerMixin, DDIMInverseScheduler):
    """:class:`diffusers.DDIMInverseScheduler` with one fused pass per step: prev and
    ``pred_original_sample`` are the two rows of one ``linear_step`` call, with
    coefficients formed in float64 from stock's float32 ``alphas_cumprod`` (one table per
    ``set_timesteps``). ``clip_sample`` clamps the x0 between two calls (x0, then
    ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` over (x, m, clamped x0)). ``timestep`` may be an
    int, an element of ``timesteps`` or a (B,) tensor; no host read per step (stock reads
    a tensor timestep on the host to compare it with 0).
    """

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in _PREDICTIONS:
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, or `v_prediction`")

    def _dk_build(self, device):
        c = self.config
        N = c.num_train_timesteps
        jump = N // self.num_inference_steps if self.num_inference_steps else 1
        tab = _coeff_table(self.alphas_cumprod.to("cpu", torch.float32), float(self.initial_alpha_cumprod), jump,
                           c.prediction_type)
        ts = self.timesteps.detach().to("cpu", torch.int64).tolist() if self.num_inference_steps else []
        host = [tab[t].tolist() if 0 <= t < N else None for t in ts]
        clip = float(c.clip_sample_range) if c.clip_sample else None
        # the rows of each step index converted once (U.LinearCoeffs), not per call
        pre = [None if r is None else (U.LinearCoeffs(r[:2]) if clip is None else (U.LinearCoeffs(r[1:2]),
                                                                            U.LinearCoeffs(_clip_rows(r, True))))
               for r in host]
        return B._State(tab_host=tab, tab_dev=B.const_tensor(tab, device, torch.float64), host=host, pre=pre,
                        clip=clip)

    def _dk_rows(self, timestep, x, st):
        """(4, 2) host rows, or a (B|1, 4, 2) device table, for this timestep."""
        i = self._dk_index_of(timestep)
        if i is not None:
            rows = st.host[i]
            if rows is None:
                raise IndexError(f"timestep {int(self.timesteps[i])} is outside [0, {self.config.num_train_timesteps})")
            return rows
        ti = B.int_timestep(timestep)
        if ti is not None:
            if not 0 <= ti < self.config.num_train_timesteps:
                raise IndexError(f"timestep {ti} is outside [0, {self.config.num_train_timesteps})")
            return st.tab_host[ti].tolist()
        t = B.timestep_tensor(timestep, x)
        return st.tab_dev.index_select(0, t)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """DDIMInverseScheduler.step, fused; ``timestep`` may also be a (B,) tensor."""
        x, m = B.promote(sample, model_output)
        st = self._dk_state(x.device)
        i = self._dk_index_of(timestep)
        pre = st.pre[i] if i is not None else None
        if pre is not None:  # an element of timesteps: the rows prepared at set_timesteps
            if st.clip is None:
                prev, x0 = U.linear_step([x, m], pre)
            else:
                (x0,) = U.linear_step([x, m], pre[0])
                x0 = x0.clamp(-st.clip, st.clip)
                (prev,) = U.linear_step([x, m, x0], pre[1])
            return (prev, x0) if not return_dict else B.output(DDIMSchedulerOutput, prev, x0)
        rows = self._dk_rows(timestep, x, st)
        host = not isinstance(rows, torch.Tensor)
        if st.clip is None:
            prev, x0 = U.linear_step([x, m], rows[:2] if host else rows[:, :2].contiguous())
        else:
            (x0,) = U.linear_step([x, m], rows[1:2] if host else rows[:, 1:2].contiguous())
            x0 = x0.clamp(-st.clip, st.clip)
            (prev,) = U.linear_step([x, m, x0], _clip_rows(rows, host))
        if not return_dict:
            return (prev, x0)
        return B.output(DDIMSchedulerOutput, prev, x0)


def _clip_rows(rows, host):
    """prev over (x, m, clamped x0): sqrt(1 - a_t) eps + sqrt(a_t) x0c."""
    if host:
        (e0, e1), (rp, rq) = rows[2], rows[3]
        return ((rq * e0, rq * e1, rp),)
    e, r = rows[:, 2], rows[:, 3]
    return torch.stack([r[:, 1] * e[:, 0], r[:, 1] * e[:, 1], r[:, 0]], -1).unsqueeze(1)
