"""FusedSASolverScheduler: SASolverScheduler (stochastic Adams predictor and corrector)
with one dk.linear_step per step."""

from __future__ import annotations

import math

import torch
from diffusers import SASolverScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedSASolverScheduler"]


def _exp_negative(order, a, b):
    # stock's get_coefficients_exponential_negative: integral of exp(-x) x^order over [a, b]
    e = math.exp(-b)
    d = math.exp(b - a)
    if order == 0:
        return e * (d - 1)
    if order == 1:
        return e * ((a + 1) * d - (b + 1))
    if order == 2:
        return e * ((a**2 + 2 * a + 2) * d - (b**2 + 2 * b + 2))
    return e * ((a**3 + 3 * a**2 + 6 * a + 6) * d - (b**3 + 3 * b**2 + 6 * b + 6))


def _exp_positive(order, a, b, tau):
    # stock's get_coefficients_exponential_positive: integral of exp(x (1 + tau^2)) x^order over [a, b]
    k = 1 + tau**2
    be, ae = k * b, k * a
    e, d = math.exp(be), math.exp(-(be - ae))
    if order == 0:
        return e * (1 - d) / k
    if order == 1:
        return e * ((be - 1) - (ae - 1) * d) / k**2
    if order == 2:
        return e * ((be**2 - 2 * be + 2) - (ae**2 - 2 * ae + 2) * d) / k**3
    return e * ((be**3 - 3 * be**2 + 6 * be - 6) - (ae**3 - 3 * ae**2 + 6 * ae - 6) * d) / k**4


def _lagrange(lams):
    """Stock's lagrange_polynomial_coefficient: row i holds the coefficients of the i-th
    Lagrange basis polynomial on the nodes ``lams``, highest power first."""
    rows = []
    for i, li in enumerate(lams):
        poly, den = [1.0], 1.0
        for j, lj in enumerate(lams):
            if j != i:
                poly = [p - lj * q for p, q in zip(poly + [0.0], [0.0] + poly, strict=True)]
                den *= li - lj
        rows.append([p / den for p in poly])
    return rows


def _gradient_coefficients(order, lam_s0, lam_t, lams, tau, predict_x0):
    """Stock's get_coefficients_fn, in float64."""
    lag = _lagrange(lams)
    out = []
    for i in range(order):
        c = 0.0
        for j in range(order):
            e = (_exp_positive(order - 1 - j, lam_s0, lam_t, tau) if predict_x0
                 else _exp_negative(order - 1 - j, lam_s0, lam_t))
            c += lag[i][j] * e
        out.append(c)
    return out


class FusedSASolverScheduler(B.IndexedSchedulerMixin, SASolverScheduler):
    """:class:`diffusers.SASolverScheduler` with one fused pass per step: the corrector
    (for the previous step), the converted model output kept as history and the
    predictor's new sample are the rows of one ``linear_step`` over (x, model output, the
    last sample, the last noise, the previous converted outputs), with every coefficient
    formed on the host in float64 (stock evaluates its exponential integrals and
    Lagrange coefficients in float32 tensors every step). The noise is stock's own
    ``randn_tensor`` draw (same seed, same image) or ``variance_noise=``; ``tau_func`` is
    called with the step's timestep as a Python number read from the host table (stock
    passes the tensor and compares it on the host). ``thresholding`` with
    ``algorithm_type="data_prediction"`` runs stock's quantile pass on the fused x0 first.

    Not supported (``NotImplementedError`` at construction): ``predictor_order`` or
    ``corrector_order`` 4 (the step would need 7 operands; linear_step takes 6),
    ``thresholding`` with ``algorithm_type="noise_prediction"`` (stock reads the training
    tables at the timestep tensor there), noise mode ``"kernel"`` (the corrector reuses the
    step's noise tensor, so it must exist). A (B,) timestep or a step under torch.compile
    is not supported either (the multistep history and order are per loop)."""

    def _dk_check_config(self):
        c = self.config
        for name in ("predictor_order", "corrector_order"):
            if getattr(c, name) > 3:
                raise B.unsupported(self, name, getattr(c, name), "linear_step takes at most 6 operands")
        if c.thresholding and c.algorithm_type == "noise_prediction":
            raise B.unsupported(self, "thresholding", True, "with algorithm_type='noise_prediction' stock "
                                "thresholds with the training tables indexed by the timestep tensor")
        p = c.prediction_type
        if p not in ("epsilon", "sample", "v_prediction") and not (p == "flow_prediction"
                                                                   and c.algorithm_type == "data_prediction"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, `v_prediction`, or "
                             "`flow_prediction` for the SASolverScheduler.")

    def set_noise_mode(self, dk_noise: str = "stock", dk_seeds=None) -> None:
        if dk_noise == "kernel":
            raise B.unsupported(self, "dk_noise", dk_noise, "the corrector reuses each step's noise tensor")
        super().set_noise_mode(dk_noise, dk_seeds)

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = self.sigmas.detach().to("cpu", torch.float32).tolist()
        if self.config.use_flow_sigmas:
            alpha, sigt = [1 - s for s in sig], list(sig)
        else:
            alpha = [1 / (s**2 + 1) ** 0.5 for s in sig]
            sigt = [s * a for s, a in zip(sig, alpha, strict=True)]
        lam = [(math.log(a) - math.log(s)) if a > 0 and s > 0 else math.nan for a, s in zip(alpha, sigt, strict=True)]
        ts = self.timesteps.detach().to("cpu").tolist()
        return B._State(**{**tabs, "sig_host": sig}, alpha_host=alpha, sigt_host=sigt, lam_host=lam,
                        ts_host=ts)

    def _dk_convert(self, st, i):
        """The converted output as c = ex x + em m (stock's convert_model_output)."""
        c = self.config
        p = c.prediction_type
        a, s = st.alpha_host[i], st.sigt_host[i]
        if c.algorithm_type == "data_prediction":
            if p == "epsilon":
                return 1 / a, -s / a
            if p == "sample":
                return 0.0, 1.0
            if p == "v_prediction":
                return a, -s
            return 1.0, -st.sig_host[i]  # flow_prediction
        if p == "epsilon":
            return 0.0, 1.0
        if p == "sample":
            return 1 / s, -a / s
        return s, a  # v_prediction

    def _dk_update(self, st, t_idx, s_idx, lam_idx0, order, tau, corrector):
        """(x coefficient, gradient coefficients newest first, noise coefficient) of stock's
        stochastic Adams-Bashforth (predictor) / Adams-Moulton (corrector) update from
        sigma index s_idx to t_idx, interpolation nodes lam_idx0, lam_idx0 - 1, ..."""
        predict_x0 = self.predict_x0
        at, sgt, lt = st.alpha_host[t_idx], st.sigt_host[t_idx], st.lam_host[t_idx]
        a0, s0, l0 = st.alpha_host[s_idx], st.sigt_host[s_idx], st.lam_host[s_idx]
        h = lt - l0
        lams = [st.lam_host[lam_idx0 - k] for k in range(order)]
        g = _gradient_coefficients(order, l0, lt, lams, tau, predict_x0)
        k = 1 + tau**2
        if predict_x0 and order == 2:
            if corrector:
                mod = math.exp(k * lt) * (h / 2 - (h * k - 1 + math.exp(k * (-h))) / (k**2 * h))
            else:
                lp = st.lam_host[s_idx - 1]
                mod = math.exp(k * lt) * (h**2 / 2 - (h * k - 1 + math.exp(k * (-h))) / k**2) / (l0 - lp)
            g[0] += mod
            g[1] -= mod
        if predict_x0:
            scale = k * sgt * math.exp(-(tau**2) * lt)
            noise = sgt * math.sqrt(1 - math.exp(-2 * tau**2 * h))
            cx = math.exp(-(tau**2) * h) * (sgt / s0)
        else:
            scale = -k * at
            noise = tau * sgt * math.sqrt(math.exp(2 * h) - 1)
            cx = at / a0
        return cx, [scale * v for v in g], noise

    def _dk_tau(self, timestep_value) -> float:
        return float(self.tau_func(timestep_value))

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, variance_noise=None):
        """SASolverScheduler.step, fused; ``variance_noise`` is the step's noise."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        if i is None:
            raise NotImplementedError("FusedSASolverScheduler needs a scalar timestep outside torch.compile (its "
                                      "multistep history and order are per loop)")
        x, m = sample, model_output
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            m = m[:, :3]
        n_hist = max(c.predictor_order, c.corrector_order - 1)
        use_corrector = i > 0 and self.last_sample is not None
        ex, em = self._dk_convert(st, i)
        if c.thresholding:
            m = self._threshold_sample(U.linear_step([x, m], [[ex, em]])[0])
            ex, em = 0.0, 1.0
        # operands: x, m, last sample, last noise, then the previous converted outputs newest first
        if c.lower_order_final:
            p_order = min(c.predictor_order, len(self.timesteps) - i)
            c_order = min(c.corrector_order, len(self.timesteps) - i + 1)
        else:
            p_order, c_order = c.predictor_order, c.corrector_order
        p_order = min(p_order, self.lower_order_nums + 1)
        c_order = min(c_order, self.lower_order_nums + 2)
        n_old = max(p_order - 1, (self.this_corrector_order - 1) if use_corrector else 0)
        J = 4 + n_old
        conv = [ex, em] + [0.0] * (J - 2)

        def hist(k):  # the k-th previous converted output (k >= 1) as a row
            r = [0.0] * J
            r[3 + k] = 1.0
            return r

        def add(acc, row, w):
            return [a + w * r for a, r in zip(acc, row, strict=True)]

        if use_corrector:
            tau_c = self._dk_last_tau
            cx, g, cn = self._dk_update(st, i, i - 1, i, self.this_corrector_order, tau_c, True)
            xc = [0.0] * J
            xc[2], xc[3] = cx, cn
            xc = add(xc, conv, g[0])
            for k in range(1, len(g)):
                xc = add(xc, hist(k), g[k])
        else:
            xc = [1.0] + [0.0] * (J - 1)
        tau = self._dk_tau(st.ts_host[i])
        px, pg, pn = self._dk_update(st, i + 1, i, i, p_order, tau, False)
        pr = [px * v for v in xc]
        pr = add(pr, conv, pg[0])
        for k in range(1, len(pg)):
            pr = add(pr, hist(k), pg[k])
        noise, _ = B.step_noise(self, x, generator, variance_noise, True, shape=tuple(m.shape), dtype=m.dtype,
                                tensor=True)  # kept as the next step's last_noise
        inputs = [x, m, self.last_sample if use_corrector else x, self.last_noise if use_corrector else x]
        inputs += [self.model_outputs[-k] for k in range(1, n_old + 1)]
        rows = [pr]
        keep_xc = use_corrector
        keep_conv = not (ex == 0.0 and em == 1.0)
        if keep_xc:
            rows.append(xc)
        if keep_conv:
            rows.append(conv)
        # drop the operands every row ignores (last sample / noise without a corrector)
        used = [j for j in range(J) if j == 0 or any(r[j] != 0.0 for r in rows)]
        outs = U.linear_step([inputs[j] for j in used], [[r[j] for j in used] for r in rows],
                        [pn] + [0.0] * (len(rows) - 1), noise, None)
        prev = outs[0]
        corrected = outs[1] if keep_xc else x
        converted = outs[-1] if keep_conv else m
        for k in range(n_hist - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1] = converted
        self.timestep_list[-1] = timestep
        self.this_predictor_order, self.this_corrector_order = p_order, c_order
        self.last_sample, self.last_noise = corrected, noise
        self._dk_last_tau = tau
        if self.lower_order_nums < n_hist:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = prev.to(x.dtype) if prev.dtype != x.dtype else prev
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)
