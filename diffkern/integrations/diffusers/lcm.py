"""FusedLCMScheduler: LCMScheduler with dk.lcm_step."""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ... import _validate as V
from ... import unchecked as U
from . import _base as B

__all__ = ["FusedLCMScheduler"]


class FusedLCMScheduler(B.IndexedSchedulerMixin, LCMScheduler):
    """:class:`diffusers.LCMScheduler` with one fused pass per step (``dk.lcm_step``, which
    also writes ``denoised``). Stock indexes its CPU ``alphas_cumprod`` with the device
    timestep (three host reads per step); here the step index picks (t, t_prev) from
    device tensors prepared in set_timesteps. The last step (``step_index ==
    num_inference_steps - 1``) returns ``denoised``; stock's custom-timesteps quirk (a
    sliced list whose last step still adds noise, from t to itself) is reproduced.
    ``thresholding`` runs stock's quantile pass on the fused x0. ``add_noise`` is
    ``dk.q_sample``."""

    def _dk_check_config(self):
        c = self.config
        if c.prediction_type not in V.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, `sample` or"
                             " `v_prediction` for `LCMScheduler`.")
        if c.clip_sample and not c.thresholding and not c.clip_sample_range > 0:
            raise B.unsupported(self, "clip_sample_range", c.clip_sample_range, "the fused clip needs a range > 0")

    def _dk_build(self, device):
        c = self.config
        N = c.num_train_timesteps
        ts = self.timesteps.detach().to("cpu", torch.int64)
        n = ts.numel()
        nis = self.num_inference_steps
        # t_prev per position: the next timestep, t itself past the end (stock's quirk), -1
        # (the final step: x_prev = denoised) at step_index == num_inference_steps - 1
        nxt = [int(ts[k + 1]) if k + 1 < n else int(ts[k]) for k in range(n)]
        if nis is not None and 0 < nis <= n:
            nxt[nis - 1] = -1
        ac = self.alphas_cumprod.to("cpu", torch.float32)
        step_table = ac
        # The kernels take t_prev < t. Stock's quirk steps from t to t: the step reads a copy
        # of the table whose entry t - 1 holds alphas_cumprod[t] (c_skip / c_out use t itself).
        vals = set(ts.tolist()) | {v for v in nxt if v >= 0}
        for k in range(n if nis is not None else 0):  # (before set_timesteps only add_noise runs)
            if nxt[k] == int(ts[k]):
                tq = nxt[k]
                if tq < 1 or (tq - 1) in vals:
                    raise B.unsupported(self, "timesteps", ts.tolist()[-4:], f"a step from t={tq} to itself "
                                        "(custom timesteps with strength < 1) needs t - 1 free in the schedule")
                if step_table is ac:
                    step_table = ac.clone()
                step_table[tq - 1] = ac[tq]
                nxt[k] = tq - 1
        prev = torch.arange(N, dtype=torch.int64) - 1
        for k in range(n - 1, -1, -1):
            if 0 <= ts[k] < N:
                prev[ts[k]] = nxt[k]
        return B._State(ts_dev=B.const_tensor(ts, device, torch.int64), n=n, init_index=self._dk_init_positions(ts),
                        table=B.const_tensor(ac, device, torch.float32),
                        step_table=B.const_tensor(step_table, device, torch.float32),
                        prev=B.const_tensor(prev, device, torch.int64),
                        t_steps=B.per_step(B.const_tensor(ts, device, torch.int64)),
                        tp_steps=B.per_step(B.const_tensor(nxt, device, torch.int64)),
                        prediction=V.PREDICTION_TYPES[c.prediction_type],
                        clip=float(c.clip_sample_range) if c.clip_sample and not c.thresholding else None)

    @staticmethod
    def _dk_init_positions(ts):
        vals = ts.tolist()
        where: dict = {}
        for k, v in enumerate(vals):
            where.setdefault(v, []).append(k)
        return [where[v][1] if len(where[v]) > 1 else where[v][0] for v in vals]

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        """LCMScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        x, m = B.promote(sample, model_output)
        if i is not None:
            t, tp = st.t_steps[i], st.tp_steps[i]
        else:
            t = B.timestep_tensor(timestep, x)
            tp = st.prev.index_select(0, t)
        # stock draws no noise on the last step: a generator list is then not consumed either
        draws = i is None or i != self.num_inference_steps - 1 or variance_noise is not None
        if self.noise_mode == "kernel":
            noise, gen = B.noise_args(x, generator, variance_noise, draws)
            if not draws and isinstance(generator, torch.Generator):
                gen = generator
        else:  # stock draws in denoised's dtype: x's (the promoted one)
            noise, gen = B.step_noise(self, x, generator, variance_noise, draws)
        pred, clip = st.prediction, st.clip
        if c.thresholding:
            m = self._threshold_sample(B.pred_x0(x, m, t, st, pred, None, table=st.step_table))
            pred = V.PREDICTION_TYPES["sample"]
        final = None if i is None else i == self.num_inference_steps - 1
        prev, den = U.lcm_step(x, m, t, tp, st.step_table, pred, c.timestep_scaling, 0.5, clip, True, noise, gen,
                                final=final)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, den)
        return B.output(LCMSchedulerOutput, prev, den)

    def add_noise(self, original_samples, noise, timesteps):
        """LCMScheduler.add_noise (dk.q_sample, coefficients in float32)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        return U.q_sample(x0, B.timestep_tensor(timesteps, x0), st.table, z)[0]
