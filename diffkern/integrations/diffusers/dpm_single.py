"""FusedDPMSolverSinglestepScheduler: DPMSolverSinglestepScheduler (orders 1-3, every
algorithm and solver type) with one dk.linear_step per step."""

from __future__ import annotations

import math

import torch
from diffusers import DPMSolverSinglestepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedDPMSolverSinglestepScheduler"]


def _div(p: float, q: float) -> float:
    """p / q with IEEE results at q = 0 (stock divides tensors there: inf / nan, no error)."""
    if q == 0:
        return math.nan if p == 0 or p != p else math.copysign(math.inf, p)
    return p / q


def _log(v: float) -> float:
    return math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def _sqrt(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan


class _Sched:
    """alpha_t, sigma_t, lambda_t of one sigma (VP or flow), in float64."""

    def __init__(self, s: float, flow: bool):
        if flow:
            self.alpha, self.sigma = 1 - s, s
        else:
            self.alpha = 1 / math.sqrt(s * s + 1)
            self.sigma = s * self.alpha
        self.lam = _log(self.alpha) - _log(self.sigma)


def _update_coeffs(order: int, algo: str, stype: str, t: _Sched, s0: _Sched, s1: _Sched | None,
                   s2: _Sched | None):
    """(a, (w0, w1, w2), noise): x_t = a x_s + w0 m0 + w1 m1 + w2 m2 + noise z, stock's
    update formulas with D0 / D1 / D2 expanded onto the model outputs (m0 the newest)."""
    base = {1: s0, 2: s1, 3: s2}[order]
    h = t.lam - base.lam
    sde = algo == "sde-dpmsolver++"
    if algo == "dpmsolver":
        ep = math.exp(h) if h < 700 else math.inf
        a = _div(t.alpha, base.alpha)
        S = t.sigma * (ep - 1.0)
        b0 = -S
        g1 = -(t.sigma * (_div(ep - 1.0, h) - 1.0))  # weight of a first difference, heun form
        g2 = -(t.sigma * (_div(ep - 1.0 - h, h * h) - 0.5))
        half = -0.5 * S
    else:
        E = math.exp(-h)
        if sde:
            a = _div(t.sigma, base.sigma) * E
            Q = t.alpha * (1 - E * E)
            b0 = Q
            g1 = t.alpha * (_div(1.0 - E * E, -2.0 * h) + 1.0)
            g2 = t.alpha * (_div(1.0 - E * E + (-2.0 * h), (-2.0 * h) ** 2) - 0.5)
            half = 0.5 * Q
        else:
            a = _div(t.sigma, base.sigma)
            A = t.alpha * (E - 1.0)
            b0 = -A
            g1 = t.alpha * (_div(E - 1.0, h) + 1.0)
            g2 = -(t.alpha * (_div(E - 1.0 + h, h * h) - 0.5))
            half = -0.5 * A
    noise = t.sigma * _sqrt(1.0 - math.exp(-2 * h)) if sde else 0.0
    if order == 1:
        return a, (b0, 0.0, 0.0), noise
    if order == 2:
        r0 = _div(s0.lam - s1.lam, h)
        b1 = half if stype == "midpoint" else g1  # the D1 = (m0 - m1) / r0 weight
        k = _div(b1, r0)
        return a, (k, b0 - k, 0.0), noise
    r0, r1 = _div(s0.lam - s2.lam, h), _div(s1.lam - s2.lam, h)
    # weights on D1_0 = (m1 - m2) / r1 and D1_1 = (m0 - m2) / r0
    if stype == "midpoint":
        c10, c11 = 0.0, g1
    else:  # D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)
        d = r0 - r1
        c10 = g1 * _div(r0, d) + g2 * _div(-2.0, d)
        c11 = g1 * _div(-r1, d) + g2 * _div(2.0, d)
    k10, k11 = _div(c10, r1), _div(c11, r0)
    return a, (k11, k10, b0 - k10 - k11), noise


class FusedDPMSolverSinglestepScheduler(B.IndexedSchedulerMixin, DPMSolverSinglestepScheduler):
    """:class:`diffusers.DPMSolverSinglestepScheduler` with one fused pass per step: the
    prediction-type conversion is linear in (x, model_output), so the step's
    ``x_t = a x_s + sum_k w_k m_k (+ noise)`` over the group's start sample, the current
    (x, model_output) and the history, and the converted output kept as history, are the
    two rows of one ``linear_step`` call. Coefficients are stock's update formulas,
    formed in float64 on the host from stock's float32 sigmas. Orders 1-3, all three
    algorithm types (``sde-dpmsolver++`` draws stock's ``randn_tensor`` numbers), both
    solver types, every sigma option, flow sigmas. ``thresholding`` (dpmsolver++ /
    sde-dpmsolver++) runs stock's quantile pass between two calls (x0, then the step).

    A (B,) timestep (and torch.compile) finds each sample's position on the device and
    takes its coefficients from a table (per position, per history depth) over (x,
    model_output, the group's start sample ``self.sample``, the history); a sample at an
    order-1 position starts a group (``self.sample`` becomes x for it, by a select).

    Not supported (``NotImplementedError``): ``thresholding`` with ``algorithm_type=
    "dpmsolver"`` (at construction: stock's step indexes its ``alpha_t`` / ``sigma_t``
    tables with ``timestep=None`` there, so it thresholds with whole tables); a (B,)
    timestep or torch.compile together with ``thresholding`` (at ``step``)."""

    def _dk_check_config(self):
        c = self.config
        if c.thresholding and c.algorithm_type == "dpmsolver":
            raise B.unsupported(self, "thresholding", True, "with algorithm_type='dpmsolver' stock's step indexes "
                                "its alpha_t / sigma_t tables with timestep=None: whole tables, not the step's values")

    def _dk_build(self, device):
        return B._State(**self._dk_sigma_tables(device), per_sample={})

    def _dk_convert_row(self, s: float):
        """The converted model output as a row over (x, model_output) at sigma s."""
        c = self.config
        p = c.prediction_type
        sc = _Sched(s, bool(c.use_flow_sigmas))
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if p == "epsilon":
                return (_div(1.0, sc.alpha), _div(-sc.sigma, sc.alpha))
            if p == "sample":
                return (0.0, 1.0)
            if p == "v_prediction":
                return (sc.alpha, -sc.sigma)
            if p == "flow_prediction":
                return (1.0, -s)
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, `v_prediction`, "
                             "or `flow_prediction` for the DPMSolverSinglestepScheduler.")
        if p == "epsilon":
            return (0.0, 1.0)
        if p == "sample":
            return (_div(1.0, sc.sigma), _div(-sc.alpha, sc.sigma))
        if p == "v_prediction":
            return (sc.sigma, sc.alpha)
        raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, or `v_prediction` for "
                         "the DPMSolverSinglestepScheduler.")

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        """DPMSolverSinglestepScheduler.step, fused."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        m = model_output
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            m = m[:, :3]
        x, m = B.promote(sample, m)
        outs = self.model_outputs
        # (m1, m2): model_outputs[-2], [-3] after stock's shift, i.e. [-1], [-2] before it; stock
        # lowers the order while model_outputs[-order] is None
        shifted = [outs[-1] if len(outs) > 1 else None, outs[-2] if len(outs) > 2 else None]
        avail = 1 if shifted[0] is None else (2 if shifted[1] is None else 3)
        if i is None:
            prev, m0 = self._dk_step_per_sample(x, m, timestep, st, shifted, avail, generator, variance_noise)
        else:
            order, (cx, cm), a, (w0, w1, w2), nz = self._dk_host_coeffs(i, st, avail)
            if order == 1:
                self.sample = x
            prev, m0 = self._dk_step_host(x, m, order, cx, cm, a, w0, w1, w2, nz, shifted, generator,
                                          variance_noise)
        for k in range(c.solver_order - 1):
            outs[k] = outs[k + 1]
        outs[-1] = m0
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)

    def _dk_host_coeffs(self, i: int, st, avail: int):
        """(order, conversion row, a, (w0, w1, w2), noise) at position i, history ``avail`` deep."""
        c = self.config
        sig = st.sig_host
        order = min(self.order_list[i], avail, i + 1)
        flow = bool(c.use_flow_sigmas)
        sch = [_Sched(sig[k], flow) if 0 <= k < len(sig) else None for k in (i + 1, i, i - 1, i - 2)]
        a, w, nz = _update_coeffs(order, c.algorithm_type, c.solver_type, *sch)
        return order, self._dk_convert_row(sig[i]), a, w, nz

    def _dk_step_host(self, x, m, order, cx, cm, a, w0, w1, w2, nz, shifted, generator, variance_noise):
        c = self.config
        xs = self.sample
        sde = c.algorithm_type == "sde-dpmsolver++"
        z, gen = B.step_noise(self, x, generator, variance_noise, sde)
        terms = [(xs, a), (shifted[0], w1 if order > 1 else 0.0), (shifted[1], w2 if order > 2 else 0.0)]
        terms = [(tsr, w) for tsr, w in terms if w != 0.0 or tsr is xs]
        if c.thresholding:
            (m0,) = U.linear_step([x, m], ((cx, cm),))
            m0 = self._threshold_sample(m0)
            inputs = [xs, m0] + [tsr for tsr, _ in terms[1:]]
            (prev,) = U.linear_step(inputs, ((a, w0, *[w for _, w in terms[1:]]),), (nz,) if sde else None, z, gen)
        else:
            inputs, row, conv = [x, m], [w0 * cx, w0 * cm], [cx, cm]
            for tsr, w in terms:
                if tsr is x:
                    row[0] += w
                else:
                    inputs.append(tsr)
                    row.append(w)
                    conv.append(0.0)
            prev, m0 = U.linear_step(inputs, (tuple(row), tuple(conv)), (nz, 0.0) if sde else None, z, gen)
        return prev, m0

    def _dk_step_per_sample(self, x, m, timestep, st, shifted, avail, generator, variance_noise):
        """A (B,) timestep: each sample's coefficients from a table over (x, m, the group's
        start sample, m1, m2) built once per history depth; a sample whose order is 1
        starts a group (its start sample becomes x, by a select on the device)."""
        c = self.config
        if c.thresholding:
            raise NotImplementedError("per-sample timesteps (or torch.compile) with thresholding")
        tabs = st.per_sample.get(avail)
        if tabs is None:
            rows, noise, first = [], [], []
            for i in range(st.n):
                order, (cx, cm), a, (w0, w1, w2), nz = self._dk_host_coeffs(i, st, avail)
                xs_x, xs_s = (a, 0.0) if order == 1 else (0.0, a)
                row = [w0 * cx + xs_x, w0 * cm, xs_s, w1, w2][:{1: 2, 2: 4, 3: 5}[avail]]
                conv = [cx, cm, 0.0, 0.0, 0.0][:len(row)]
                rows.append((row, conv))
                noise.append((nz, 0.0))
                first.append(order == 1)
            tabs = st.per_sample[avail] = (B.const_tensor(rows, st.sig_dev.device, torch.float64),
                                           B.const_tensor(noise, st.sig_dev.device, torch.float64),
                                           B.const_tensor(first, st.sig_dev.device, torch.bool))
        rows, noise, first = tabs
        idx, valid = self._dk_positions(timestep, x, st)
        v = rows.index_select(0, idx)
        coeffs = torch.where(valid.reshape(-1, 1, 1), v, torch.full_like(v, float("nan")))
        inputs = [x, m]
        if avail > 1:
            inputs += [x if self.sample is None else self.sample, shifted[0]] + ([shifted[1]] if avail > 2 else [])
        sde = c.algorithm_type == "sde-dpmsolver++"
        z, gen = B.step_noise(self, x, generator, variance_noise, sde)
        prev, m0 = U.linear_step(inputs, coeffs, noise.index_select(0, idx) if sde else None, z, gen)
        starts = first.index_select(0, idx).reshape(-1, *([1] * (x.dim() - 1)))
        self.sample = x if self.sample is None else torch.where(starts, x, self.sample)
        return prev, m0
