"""FusedDEISMultistepScheduler: DEISMultistepScheduler (log-rho DEIS, orders 1-3) with one
dk.linear_step per step."""

from __future__ import annotations

import math

import torch
from diffusers import DEISMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDEISMultistepScheduler"]


def _ind2(t, b, c):
    # stock's ind_fn: Integrate[(log(t) - log(c)) / (log(b) - log(c)), {t}]
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):
    # stock's ind_fn: Integrate[(log(t) - log(c))(log(t) - log(d)) / (log(b) - log(c))(log(b) - log(d)), {t}]
    lt, lc, ld, lb = math.log(t), math.log(c), math.log(d), math.log(b)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))


def _div(a: float, b: float) -> float:
    """IEEE a / b (stock's float tensors give inf / nan where Python floats would raise)."""
    try:
        return a / b
    except ZeroDivisionError:
        return math.copysign(math.inf, a) * math.copysign(1.0, b) if a else math.nan


class FusedDEISMultistepScheduler(B.IndexedSchedulerMixin, DEISMultistepScheduler):
    """:class:`diffusers.DEISMultistepScheduler` with one fused pass per step: the
    converted model output (stock's ``model_outputs`` history, the noise estimate
    ``(x - alpha x0) / sigma``) and the new sample are the two rows of one ``linear_step``
    over (x, model output, the previous converted outputs), with the prediction-type
    conversion folded into float64 host coefficients. ``thresholding`` runs stock's
    quantile pass on the fused x0 first (a second pass: the clamp is not linear). For
    ``prediction_type="epsilon"`` the history holds the model output itself. The order
    logic (warm-up, ``lower_order_final``) and every sigma option are stock's.

    A (B,) timestep, or a step under torch.compile, is not supported (the multistep
    order and history are per loop: ``NotImplementedError``)."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, `v_prediction`, or "
                             "`flow_prediction` for the DEISMultistepScheduler.")

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = self.sigmas.detach().to("cpu", torch.float32).tolist()
        if self.config.use_flow_sigmas:
            alpha = [1 - s for s in sig]
            sigt = list(sig)
        else:
            alpha = [1 / (s**2 + 1) ** 0.5 for s in sig]
            sigt = [s * a for s, a in zip(sig, alpha, strict=True)]
        return B._State(**{**tabs, "sig_host": sig}, alpha_host=alpha, sigt_host=sigt)

    def _dk_x0(self, st, i):
        """x0 = A x + B m at step i (stock's convert_model_output)."""
        p = self.config.prediction_type
        a, s = st.alpha_host[i], st.sigt_host[i]
        if p == "epsilon":
            return 1 / a, -s / a
        if p == "sample":
            return 0.0, 1.0
        if p == "v_prediction":
            return a, -s
        return 1.0, -st.sig_host[i]  # flow_prediction

    def _dk_update(self, st, i, order):
        """prev = cx x + sum_k c[k] eps_k (eps_0 this step's, eps_1 the previous one, ...)."""
        at, st_ = st.alpha_host[i + 1], st.sigt_host[i + 1]
        a0, s0 = st.alpha_host[i], st.sigt_host[i]
        if order == 1:
            h = (math.log(at) - math.log(st_)) - (math.log(a0) - math.log(s0))
            return at / a0, [-(st_ * math.expm1(h))]
        rt, r0 = st_ / at, s0 / a0
        r1 = st.sigt_host[i - 1] / st.alpha_host[i - 1]
        if order == 2:
            c1 = _ind2(rt, r0, r1) - _ind2(r0, r0, r1)
            c2 = _ind2(rt, r1, r0) - _ind2(r0, r1, r0)
            return at / a0, [at * c1, at * c2]
        r2 = st.sigt_host[i - 2] / st.alpha_host[i - 2]
        c1 = _ind3(rt, r0, r1, r2) - _ind3(r0, r0, r1, r2)
        c2 = _ind3(rt, r1, r2, r0) - _ind3(r0, r1, r2, r0)
        c3 = _ind3(rt, r2, r0, r1) - _ind3(r0, r2, r0, r1)
        return at / a0, [at * c1, at * c2, at * c3]

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """DEISMultistepScheduler.step, fused."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        if i is None:
            raise NotImplementedError("FusedDEISMultistepScheduler needs a scalar timestep outside torch.compile "
                                      "(its multistep history and order are per loop)")
        n = len(self.timesteps)
        lower_final = i == n - 1 and c.lower_order_final and n < 15
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        x, u = sample, model_output
        ax, au = self._dk_x0(st, i)
        if c.thresholding:
            u = self._threshold_sample(U.linear_step([x, u], [[ax, au]])[0])
            ax, au = 0.0, 1.0
        alpha, sigma = st.alpha_host[i], st.sigt_host[i]
        if c.prediction_type == "epsilon" and not c.thresholding:
            ex, eu = 0.0, 1.0  # (x - alpha x0) / sigma is the model output itself
        else:
            ex, eu = _div(1 - alpha * ax, sigma), _div(-alpha * au, sigma)
        cx, cs = self._dk_update(st, i, order)
        hist = [self.model_outputs[-k] for k in range(1, order)]
        inputs = [x, u] + hist
        rows = [[cx + cs[0] * ex, cs[0] * eu] + cs[1:]]
        keep_eps = ex != 0.0 or eu != 1.0
        if keep_eps:
            rows.append([ex, eu] + [0.0] * len(hist))
        outs = U.linear_step(inputs, rows)
        prev = outs[0]
        eps = outs[1] if keep_eps else u
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = eps
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)
