"""FusedUniPCMultistepScheduler: UniPCMultistepScheduler with the UniC corrector and the
UniP predictor of a step in one dk.linear_step pass."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedUniPCMultistepScheduler"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _add(*terms):
    """sum of (scale, expr) with expr a dict {input name: coefficient}."""
    out: dict = {}
    for s, e in terms:
        for k, v in e.items():
            out[k] = out.get(k, 0.0) + s * v
    return out


class FusedUniPCMultistepScheduler(B.IndexedSchedulerMixin, UniPCMultistepScheduler):
    """:class:`diffusers.UniPCMultistepScheduler` with one fused pass per step.

    A step of stock is: the model output converted to x0 (or eps), the UniC corrector on
    the previous predictor's result, and the UniP predictor from the corrected sample.
    Every one of these is linear in (sample, model output, last sample, the stored
    history), with coefficients that depend only on the host sigmas and the step's
    orders, so the step is one ``linear_step`` call whose outputs are the corrected
    sample (stock's ``last_sample``), the converted output (the history entry) and the
    next sample. The coefficients, the ``rks`` and the small solves included, are formed
    in float64 on the host (stock solves on the device, a host sync per step). Orders 1-3,
    bh1/bh2, ``predict_x0``, ``lower_order_final``, ``disable_corrector``, every
    prediction type, flow sigmas and every sigma option of stock's ``set_timesteps``
    (they only shape ``self.sigmas``). ``thresholding`` runs stock's quantile pass on the
    fused x0 between two passes. ``add_noise`` is stock's.

    Not supported: ``solver_p`` (another scheduler's step inside this one), and a (B,)
    timestep (the history is shared by the batch, so every sample must be at the same
    step; ``NotImplementedError``).

    Where stock is NaN the fused step can be finite: bh1 to a final sigma of 0 multiplies
    B_h = -inf by a zero residual in stock; the fused coefficient of that residual is 0.
    """

    _dk_first_match_second = True  # stock's index_for_timestep takes the 2nd of several matches

    def _dk_check_config(self):
        c = self.config
        if c.solver_p is not None or self.solver_p is not None:
            raise B.unsupported(self, "solver_p", type(self.solver_p).__name__,
                                "another scheduler's step inside the fused one")

    def _dk_build(self, device):
        tabs = self._dk_sigma_tables(device)
        sig = np.asarray(tabs["sig_host"], dtype=np.float64)
        with np.errstate(all="ignore"):
            if self.config.use_flow_sigmas:
                alpha, sigma = 1 - sig, sig
            else:
                alpha = 1 / np.sqrt(sig**2 + 1)
                sigma = sig * alpha
            lam = np.log(alpha) - np.log(sigma)
        # The step coefficients depend only on the sigmas and the orders: kept across
        # set_timesteps calls with the same schedule (a pipeline's every call), so only a
        # first loop forms them.
        cache = self.__dict__.setdefault("_dk_coeff_cache", {})
        key = (tuple(tabs["sig_host"]), bool(self.predict_x0))
        coeffs = cache.get(key)
        if coeffs is None:
            if len(cache) >= 8:
                cache.clear()
            coeffs = cache[key] = {}
        return B._State(**tabs, alpha=alpha, sigma=sigma, lam=lam, coeffs=coeffs)

    # ---- host coefficients ----------------------------------------------------------
    def _dk_convert(self, st, i):
        """stock's convert_model_output as {input: coefficient} over (x, m)."""
        c = self.config
        a, s, sg = st.alpha[i], st.sigma[i], st.sig_host[i]
        p = c.prediction_type
        if self.predict_x0:
            if p == "epsilon":
                return {"x": 1 / a, "m": -s / a}
            if p == "sample":
                return {"m": 1.0}
            if p == "v_prediction":
                return {"x": a, "m": -s}
            if p == "flow_prediction":
                return {"x": 1.0, "m": -np.float64(sg)}
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, "
                             "`v_prediction`, or `flow_prediction` for the UniPCMultistepScheduler.")
        if p == "epsilon":
            return {"m": 1.0}
        if p == "sample":
            return {"x": 1 / s, "m": -a / s}
        if p == "v_prediction":
            return {"x": s, "m": a}
        raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, or"
                         " `v_prediction` for the UniPCMultistepScheduler.")

    def _dk_bh(self, st, t, s0, others):
        """(h_phi_1, B_h, rks, b, R) of stock's UniP/UniC for the step s0 -> t with the
        older points ``others`` (sigma indices), in float64."""
        h = st.lam[t] - st.lam[s0]
        rks = [(st.lam[si] - st.lam[s0]) / h for si in others] + [np.float64(1.0)]
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        fact = 1
        R, b = [], []
        for k in range(1, len(rks) + 1):
            R.append([r ** (k - 1) for r in rks])
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return h_phi_1, B_h, rks, np.array(b, dtype=np.float64), np.array(R, dtype=np.float64)

    def _dk_update(self, st, t, s0, h_phi_1, B_h, x, m0, hist, rhos, last_rho_term=None):
        """x_t of stock's UniP (rhos over hist) or UniC (rhos[:-1] over hist, rhos[-1] on
        the current output): x, m0 and each hist entry are expressions."""
        if self.predict_x0:
            ratio, w = st.sigma[t] / st.sigma[s0], st.alpha[t]
        else:
            ratio, w = st.alpha[t] / st.alpha[s0], st.sigma[t]
        terms = [(ratio, x), (-w * h_phi_1, m0)]
        for rho, (rk, mk) in zip(rhos, hist, strict=True):
            # rho * (mk - m0) / rk
            terms += [(-w * B_h * rho / rk, mk), (w * B_h * rho / rk, m0)]
        if last_rho_term is not None:
            rho, mt = last_rho_term
            terms += [(-w * B_h * rho, mt), (w * B_h * rho, m0)]
        return _add(*terms)

    def _dk_rows(self, st, i, corr_order, order, x0_input):
        """(names, rows, has corrected row, has converted row) of the step's linear_step
        call; the rows are [corrected sample, converted output, next sample], absent where
        not computed."""
        hit = st.coeffs.get((i, corr_order, order, x0_input))
        return hit if hit is not None else self._dk_form_rows(st, i, corr_order, order, x0_input)

    @torch._dynamo.disable  # host float64 arithmetic, not graph ops
    def _dk_form_rows(self, st, i, corr_order, order, x0_input):
        key = (i, corr_order, order, x0_input)
        X, M, LAST = {"x": 1.0}, {"m": 1.0}, {"last": 1.0}
        H = [{"h1": 1.0}, {"h2": 1.0}, {"h3": 1.0}]
        mc = {"mc": 1.0} if x0_input else self._dk_convert(st, i)
        with np.errstate(all="ignore"):
            xc = None
            if corr_order:
                others = [i - (k + 1) for k in range(1, corr_order)]
                h_phi_1, B_h, rks, b, R = self._dk_bh(st, i, i - 1, others)
                rhos = [0.5] if corr_order == 1 else list(np.linalg.solve(R, b))
                hist = list(zip(rks[:-1], H[1:corr_order], strict=True))
                xc = self._dk_update(st, i, i - 1, h_phi_1, B_h, LAST, H[0], hist, rhos[:-1], (rhos[-1], mc))
            others = [i - k for k in range(1, order)]
            h_phi_1, B_h, rks, b, R = self._dk_bh(st, i + 1, i, others)
            if order == 1:
                rhos = []
            elif order == 2:
                rhos = [0.5]
            else:
                rhos = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
            hist = list(zip(rks[:-1], H[:order - 1], strict=True))
            nxt = self._dk_update(st, i + 1, i, h_phi_1, B_h, xc if xc is not None else X, mc, hist, rhos)
        rows = ([xc] if xc is not None else []) + ([mc] if not x0_input and mc != M else []) + [nxt]
        names = [n for n in ("x", "m", "last", "mc", "h1", "h2", "h3")
                 if any(float(r.get(n, 0.0)) != 0.0 for r in rows)]
        if not names:
            names = ["x"]
        hit = (names, [[float(r.get(n, 0.0)) for n in names] for r in rows], xc is not None,
               not x0_input and mc != M)
        st.coeffs[key] = hit
        return hit

    # ---- the step -------------------------------------------------------------------
    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """UniPCMultistepScheduler.step, fused (one ``linear_step`` pass; two with
        thresholding)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self.solver_p:
            raise B.unsupported(self, "solver_p", type(self.solver_p).__name__,
                                "another scheduler's step inside the fused one")
        c = self.config
        st = self._dk_state(sample.device)
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            raise NotImplementedError(
                f"{type(self).__name__}.step takes one timestep for the whole batch (the multistep history is "
                "shared by the batch)")
        if self._step_index is None:
            # stock's first index: begin_index, else the timestep's position (from the view:
            # no read; else stock's lookup, one read per loop). Under torch.compile the index
            # is the same Python int as stock's, the step a graph break like stock's.
            i = None if self._begin_index is not None else self._dk_index_of(timestep)
            if i is not None:
                self._step_index = st.init_index[i]
            else:
                self._init_step_index(timestep)
        i = self._step_index
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        corr_order = self.this_order if use_corrector else 0
        n = len(self.timesteps)
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        order = min(order, self.lower_order_nums + 1)
        x, m = B.promote(sample, model_output)
        x0_input = bool(c.thresholding) and self.predict_x0
        mc = None
        if x0_input:
            conv = self._dk_convert(st, i)
            if conv == {"m": 1.0}:
                mc = m
            else:
                mc = U.linear_step([x, m], [[float(conv.get("x", 0.0)), float(conv.get("m", 0.0))]])[0]
            mc = self._threshold_sample(mc)
        names, rows, has_c, has_mc = self._dk_rows(st, i, corr_order, order, x0_input)
        ops = {"x": x, "m": m, "last": self.last_sample, "mc": mc}
        hist = self.model_outputs
        for k in range(1, 4):
            ops[f"h{k}"] = hist[-k] if k <= len(hist) else None
        inputs = [ops[nm] for nm in names]
        dt = x.dtype  # the history and last sample may hold another dtype (stock keeps each as made)
        for t_ in inputs:
            dt = torch.promote_types(dt, t_.dtype)
        outs = U.linear_step([t_ if t_.dtype == dt else t_.to(dt) for t_ in inputs], rows)
        j = 0
        if has_c:
            sample = outs[0]
            if sample.dtype != self.last_sample.dtype:
                sample = sample.to(self.last_sample.dtype)
            j = 1
        if has_mc:
            mc = outs[j]
            j += 1
        elif mc is None:
            mc = m if self._dk_convert(st, i) == {"m": 1.0} else None
        prev = outs[j]
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1] = mc
        self.timestep_list[-1] = timestep
        self.this_order = order
        self.last_sample = sample
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)
