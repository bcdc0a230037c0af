"""FusedDPMSolverMultistepScheduler: DPMSolverMultistepScheduler (every algorithm type,
orders 1-3, VP and flow sigmas) as one ``linear_step`` per step; and the multistep
DPM-Solver coefficient code the other DPM-Solver drop-ins (``dpm_more``) share.

Every DPM-Solver multistep update is linear in (x, the converted model output D0 and the
history D1, D2) plus one noise term, and the conversion of the model output (x0 for the
``++`` types, epsilon for the others) is linear in (x, model_output). So a step is
``out = wx x + wm m + w1 D1 + w2 D2 + wz z`` with weights that depend only on the sigmas:
they are formed once per ``set_timesteps`` in float64 from the host sigmas, for every
position and order, and a step looks its row up (host list for a scalar timestep, device
table for a (B,) one). The converted D0 is the same call's second output row (history).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDPMSolverMultistepScheduler", "DPMSolverMultistepMixin", "DPMSolverVPMixin", "update_weights"]

_SDE = ("sde-dpmsolver", "sde-dpmsolver++")
_DATA = ("dpmsolver++", "sde-dpmsolver++")  # the types whose D is x0 (else epsilon)


def update_weights(algorithm: str, solver_type: str, order: int, at, st, as0, ss0, lam_t, lams):
    """Stock's multistep update ``x_t = wx x + sum_k w[k] D_k + wz z`` in float64 (numpy
    scalars: inf/nan propagate as in stock's tensors). ``lams``: lambda at s0, s1, s2
    (newest first, ``order`` of them); D_k the converted output k steps back."""
    f = np.float64
    at, st, as0, ss0, lam_t = f(at), f(st), f(as0), f(ss0), f(lam_t)
    h = lam_t - f(lams[0])
    em, ep = np.exp(-h), np.exp(h)
    e2 = 1.0 - np.exp(-2.0 * h)
    if algorithm == "dpmsolver++":
        wx, wz = st / ss0, None
        c0 = -(at * (em - 1.0))
        c1 = (-0.5 * (at * (em - 1.0)) if solver_type == "midpoint" else at * ((em - 1.0) / h + 1.0)) \
            if order == 2 else at * ((em - 1.0) / h + 1.0)
        c2 = -(at * ((em - 1.0 + h) / h ** 2 - 0.5))
    elif algorithm == "dpmsolver":
        wx, wz = at / as0, None
        c0 = -(st * (ep - 1.0))
        c1 = (-0.5 * (st * (ep - 1.0)) if solver_type == "midpoint" else -(st * ((ep - 1.0) / h - 1.0))) \
            if order == 2 else -(st * ((ep - 1.0) / h - 1.0))
        c2 = -(st * ((ep - 1.0 - h) / h ** 2 - 0.5))
    elif algorithm == "sde-dpmsolver++":
        wx, wz = st / ss0 * em, st * np.sqrt(e2)
        c0 = at * e2
        c1 = (0.5 * (at * e2) if solver_type == "midpoint" else at * (e2 / (-2.0 * h) + 1.0)) \
            if order == 2 else at * (e2 / (-2.0 * h) + 1.0)
        c2 = at * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    elif algorithm == "sde-dpmsolver":
        wx, wz = at / as0, st * np.sqrt(np.exp(2 * h) - 1.0)
        c0 = -2.0 * (st * (ep - 1.0))
        c1 = -(st * (ep - 1.0)) if solver_type == "midpoint" else -2.0 * (st * ((ep - 1.0) / h - 1.0))
        c2 = None  # stock has no third-order sde-dpmsolver update
    else:
        raise ValueError(f"unknown algorithm_type {algorithm!r}")
    if order == 1:
        return wx, [c0], wz
    r0 = (f(lams[0]) - f(lams[1])) / h
    if order == 2:  # D1 = (m0 - m1) / r0
        return wx, [c0 + c1 / r0, -c1 / r0], wz
    r1 = (f(lams[1]) - f(lams[2])) / h
    d10 = np.array([1.0 / r0, -1.0 / r0, 0.0])
    d11 = np.array([0.0, 1.0 / r1, -1.0 / r1])
    diff = d10 - d11
    w = c0 * np.array([1.0, 0.0, 0.0]) + c1 * (d10 + (r0 / (r0 + r1)) * diff) + c2 * (diff / (r0 + r1))
    return wx, list(w), wz


def _lam(a, s):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.float64(a)) - np.log(np.float64(s))


class DPMSolverMultistepMixin(B.IndexedSchedulerMixin):
    """The fused step of the multistep DPM-Solver family. A class supplies
    ``_dk_alpha_sigma(sigma)``, ``_dk_convert(sigma) -> (cx, cm)`` (the model output's
    conversion ``D = cx x + cm m``, D being x0 for the ``++`` types, epsilon else),
    ``_dk_lower_final(i, n)`` / ``_dk_lower_second(i, n)`` (stock's order caps) and
    ``_dk_noise_dtype``."""

    _dk_first_match_second = True
    _dk_noise_dtype = torch.float32  # stock's randn_tensor dtype (None: the model output's)

    def _dk_lower_final(self, i, n):
        c = self.config
        return i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")

    def _dk_lower_second(self, i, n):
        c = self.config
        return i == n - 2 and c.lower_order_final and n < 15

    def _dk_x0_of_D(self, sigma):
        """(px, pd): x0 = px x + pd D at ``sigma`` (thresholding works on x0)."""
        if self.config.algorithm_type in _DATA:
            return 0.0, 1.0
        a, s = self._dk_alpha_sigma(sigma)
        return 1.0 / a, -s / a

    def _dk_D_of_x0(self, sigma):
        """(qx, qy): D = qx x + qy x0 (the thresholded x0 back to D)."""
        if self.config.algorithm_type in _DATA:
            return 0.0, 1.0
        a, s = self._dk_alpha_sigma(sigma)
        return 1.0 / s, -a / s

    def _dk_weights(self):
        """Host tables: rows[o][i] (the K x J coefficient rows of order o at position i,
        inputs (x, y, D1[, D2]) with y the model output, or the thresholded x0; an order
        above the position's cap (stock's lower-order final steps) has zero weights on
        the extra history, so the device tables serve a (B,) batch of positions), caps[i],
        noise[i] (K noise coefficients or None), x0rows[i] (thresholding's first pass)."""
        c = self.config
        sig = [float(v) for v in self.sigmas.detach().to("cpu", torch.float32).tolist()]
        n = len(self.timesteps)
        ab = [self._dk_alpha_sigma(np.float64(v)) for v in sig]
        lam = [_lam(a, s) for a, s in ab]
        thr = bool(c.thresholding)
        hist_row = not (thr and c.algorithm_type in _DATA) and c.solver_order > 1
        rows = {o: [] for o in range(1, c.solver_order + 1)}
        noise, x0rows, caps = [], [], []
        with np.errstate(all="ignore"):
            for i in range(n):
                cap = 1 if self._dk_lower_final(i, n) else 2 if self._dk_lower_second(i, n) else 3
                caps.append(cap)
                cx, cm = self._dk_convert(np.float64(sig[i]))
                if thr:  # pass 1: x0 from (x, m); pass 2 takes y = thresholded x0
                    px, pd = self._dk_x0_of_D(np.float64(sig[i]))
                    x0rows.append(((px + pd * cx, pd * cm),))
                    cx, cm = self._dk_D_of_x0(np.float64(sig[i]))
                at, st = ab[i + 1]
                as0, ss0 = ab[i]
                nz = None
                for o in rows:
                    oo = min(o, cap)
                    wx, w, wz = update_weights(c.algorithm_type, c.solver_type, oo, at, st, as0, ss0, lam[i + 1],
                                               [lam[i], lam[i - 1], lam[i - 2]][:oo])
                    w = w + [0.0] * (o - oo)
                    row = [wx + w[0] * cx, w[0] * cm] + w[1:]
                    rr = [tuple(float(v) for v in row)]
                    if hist_row:
                        rr.append(tuple([float(cx), float(cm)] + [0.0] * (o - 1)))
                    rows[o].append(tuple(rr))
                    nz = wz
                if nz is not None:
                    noise.append((float(nz),) + ((0.0,) if hist_row else ()))
        return rows, (noise or None), (x0rows or None), hist_row, caps

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        rows, noise, x0rows, hist_row, caps = self._dk_weights()
        f64 = torch.float64
        st = B._State(**tabs, rows=rows, noise=noise, x0rows=x0rows, hist_row=hist_row, caps=caps,
                      rows_dev={o: B.const_tensor(r, device, f64) for o, r in rows.items()},
                      noise_dev=None if noise is None else B.const_tensor(noise, device, f64),
                      x0rows_dev=None if x0rows is None else B.const_tensor(x0rows, device, f64))
        sig = self.sigmas.detach().to("cpu", torch.float32).double()
        a, s = self._dk_alpha_sigma(sig)
        st.alpha_dev = B.const_tensor(torch.as_tensor(a, dtype=torch.float64).expand_as(sig), device, torch.float32)
        st.sigvp_dev = B.const_tensor(s, device, torch.float32)
        return st

    @staticmethod
    def _dk_rows(table, idx, valid):
        """table[idx] per sample (B, ...), NaN where the timestep was not in the schedule."""
        v = table.index_select(0, idx.clamp(0, table.shape[0] - 1))
        return torch.where(valid.reshape((-1,) + (1,) * (v.dim() - 1)), v, torch.full_like(v, float("nan")))

    def add_noise(self, original_samples, noise, timesteps):
        """Stock's ``alpha_t x0 + sigma_t z`` (EDM: alpha = 1), per-sample coefficients found on
        the device (stock looks each timestep up with a host read)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        if self._begin_index is None:  # (the inverse has none: always looked up, as its stock)
            idx, valid = self._dk_positions(timesteps, x0, st)
            idx = torch.where(valid, idx, torch.full_like(idx, st.n - 1))  # stock: no match -> the last step
            valid = torch.ones_like(valid)
        else:
            i = self.step_index if self.step_index is not None else self._begin_index
            idx = torch.full((1,), i, dtype=torch.int64, device=x0.device)
            valid = torch.ones(1, dtype=torch.bool, device=x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self._dk_take(st.alpha_dev, idx, valid).reshape(shape).to(x0.dtype)
        s = self._dk_take(st.sigvp_dev, idx, valid).reshape(shape).to(x0.dtype)
        return torch.addcmul(a * x0, s, z)

    def _dk_model_output(self, model_output):
        return model_output

    def _dk_draw(self, x, generator, variance_noise, model_dtype):
        if variance_noise is not None:  # stock: variance_noise wins over the generator
            generator = None
        return B.step_noise(self, x, generator, variance_noise, True, dtype=self._dk_noise_dtype or model_dtype)

    def _dk_step(self, model_output, timestep, sample, generator, variance_noise):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        m = self._dk_model_output(model_output)
        o = min(c.solver_order, self.lower_order_nums + 1)
        i = self._dk_host_index(timestep, st)
        if i is not None:
            o = min(o, st.caps[i])  # the host path drops the history a capped step does not use
            rows = st.rows[o][i]
            nz = None if st.noise is None else st.noise[i]
            x0row = None if st.x0rows is None else st.x0rows[i]
        else:
            idx, valid = self._dk_positions(timestep, sample, st)
            rows = self._dk_rows(st.rows_dev[o], idx, valid)
            nz = None if st.noise_dev is None else self._dk_rows(st.noise_dev, idx, valid)
            x0row = None if st.x0rows_dev is None else self._dk_rows(st.x0rows_dev, idx, valid)
        y = m
        if x0row is not None:  # thresholding: stock's quantile clamp sits between two linear passes
            y = self._threshold_sample(U.linear_step([sample, m], x0row)[0])
        hist = [self.model_outputs[-k] for k in range(1, o)]
        noise = gen = None
        if nz is not None:
            noise, gen = self._dk_draw(sample, generator, variance_noise, torch.promote_types(sample.dtype, m.dtype))
        out = U.linear_step([sample, y] + hist, rows, nz, noise, gen)
        prev = out[0]
        d0 = out[1] if st.hist_row else (y if x0row is not None else None)
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = d0
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        if i is not None:
            self._step_index += 1
        return prev


class DPMSolverVPMixin(DPMSolverMultistepMixin):
    """The DPMSolverMultistep config (VP or flow sigmas, the four algorithm types, the
    learned-variance slice), shared by the forward and the inverse scheduler."""

    def _dk_check_config(self):
        c = self.config
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            raise B.unsupported(self, "solver_order", 3, "stock has no third-order sde-dpmsolver update")
        if c.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon`, `sample`, "
                             "`v_prediction`, or `flow_prediction` for the DPMSolverMultistepScheduler.")
        if c.prediction_type == "flow_prediction" and c.algorithm_type not in _DATA:
            raise B.unsupported(self, "prediction_type", c.prediction_type,
                                f"stock's {c.algorithm_type} has no flow_prediction conversion")

    def _dk_alpha_sigma(self, sigma):
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        a = 1 / ((sigma ** 2 + 1) ** 0.5)
        return a, sigma * a

    def _dk_convert(self, sigma):
        c = self.config
        p = c.prediction_type
        a, s = self._dk_alpha_sigma(sigma)
        if c.algorithm_type in _DATA:
            return {"epsilon": (1 / a, -s / a), "sample": (0.0, 1.0), "v_prediction": (a, -s),
                    "flow_prediction": (1.0, -sigma)}[p]
        return {"epsilon": (0.0, 1.0), "sample": (1 / s, -a / s), "v_prediction": (s, a)}[p]

    def _dk_model_output(self, model_output):
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            return model_output[:, :3]
        return model_output

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        """Stock's step, fused; ``timestep`` may be a (B,) tensor."""
        prev = self._dk_step(model_output, timestep, sample, generator, variance_noise)
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)  # stock: its converted output's dtype
        if prev.dtype != out_dtype:
            prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)


class FusedDPMSolverMultistepScheduler(DPMSolverVPMixin, DPMSolverMultistepScheduler):
    """:class:`diffusers.DPMSolverMultistepScheduler` with one fused ``linear_step`` per
    step (two with ``thresholding``: stock's quantile clamp of x0 sits between them).
    Every ``algorithm_type`` (``dpmsolver++``, ``dpmsolver``, ``sde-dpmsolver++``,
    ``sde-dpmsolver``), orders 1-3, both solver types, flow sigmas / ``flow_prediction``,
    ``variance_type="learned_range"``; the order logic (warm-up, ``lower_order_final``,
    ``euler_at_final``, ``final_sigmas_type``) and every sigma option (Karras / exponential
    / beta / Lu lambdas, ``lambda_min_clipped``, spacings) are stock's. The SDE types draw
    stock's noise (same seed, same image). A (B,) timestep gives each sample its own
    position's coefficients (the order, set by the shared history, is the batch's).

    Not supported (``NotImplementedError`` at construction): ``sde-dpmsolver`` with
    ``solver_order=3`` (stock's third-order update has no branch for it and fails at the
    third step), ``flow_prediction`` with the noise-space types (stock raises at the first
    step).
    """
