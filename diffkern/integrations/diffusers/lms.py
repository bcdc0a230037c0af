"""FusedLMSDiscreteScheduler: LMSDiscreteScheduler with one dk.linear_step per step and
its linear multistep coefficients computed once per ``set_timesteps``."""

from __future__ import annotations

import warnings

import numpy as np
from diffusers import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from ... import unchecked as U
from . import _base as B
from .euler import _KarrasVEMixin

__all__ = ["FusedLMSDiscreteScheduler"]

# The integrand of an LMS coefficient is a Lagrange basis polynomial of degree order - 1
# <= 3 (for the default order 4; any order when asked): Gauss-Legendre with n nodes is
# exact up to degree 2n - 1, so the integral is exact up to float64 rounding (stock's
# scipy.integrate.quad, run every step, returns the same value up to its float32 integrand).
_GL = {}


def _gauss_legendre(n: int):
    g = _GL.get(n)
    if g is None:
        g = _GL[n] = tuple(a.tolist() for a in np.polynomial.legendre.leggauss(n))
    return g


def lms_coefficients(sig, order: int, steps) -> dict:
    """Stock's ``get_lms_coefficient(min(t + 1, order), t, j)`` for every step t in
    ``steps``, in float64: {t: [c_0, ...]}, c_j the integral over [sig[t], sig[t+1]] of
    prod_{k != j} (tau - sig[t-k]) / (sig[t-j] - sig[t-k]). IEEE division (a repeated
    sigma gives inf / nan, as stock's float32 tensors do, not an exception)."""
    s = np.asarray(sig, dtype=np.float64)
    steps = np.asarray(list(steps), dtype=np.int64)
    out = {}
    with np.errstate(all="ignore"):
        for eff in range(1, order + 1):
            t = steps[np.minimum(steps + 1, order) == eff]
            if t.size == 0:
                continue
            nodes, weights = _gauss_legendre(eff // 2 + 1)
            a, b = s[t], s[t + 1]
            half, mid = (b - a) / 2, (a + b) / 2
            cols = []
            for j in range(eff):
                acc = np.zeros_like(a)
                for x, w in zip(nodes, weights, strict=True):
                    tau = half * x + mid
                    p = np.ones_like(a)
                    for k in range(eff):
                        if k != j:
                            p = p * ((tau - s[t - k]) / (s[t - j] - s[t - k]))
                    acc = acc + w * p
                cols.append(acc * half)
            for n, ti in enumerate(t.tolist()):
                out[ti] = [float(c[n]) for c in cols]
    return out


class FusedLMSDiscreteScheduler(_KarrasVEMixin, LMSDiscreteScheduler):
    """:class:`diffusers.LMSDiscreteScheduler` with one fused pass per step: the step's
    derivative (kept as history, as stock keeps ``self.derivatives``), the new sample and
    ``pred_original_sample`` are the K rows of one ``linear_step`` over (x, model output,
    the previous derivatives), with the prediction-type conversion folded into the
    coefficients. The LMS coefficients (stock integrates them with scipy every step) are
    computed on the host once per ``set_timesteps`` (per ``order`` asked), in float64.
    For ``prediction_type="epsilon"`` the derivative is the model output itself.

    A (B,) timestep, or a step under torch.compile, is not supported (the multistep
    order and history are per loop: ``NotImplementedError``)."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, or `v_prediction`")

    def _dk_build(self, device):
        st = super()._dk_build(device)
        sig = [float(v) for v in st.sig_host]
        st.lms = {(4, i): c for i, c in lms_coefficients(sig, 4, range(len(sig) - 1)).items()}
        return st

    def _dk_coeffs(self, st, order: int, i: int) -> list:
        c = st.lms.get((order, i))
        if c is None:
            c = st.lms[(order, i)] = lms_coefficients(st.sig_host, order, [i])[i]
        return c

    def step(self, model_output, timestep, sample, order: int = 4, return_dict: bool = True):
        """LMSDiscreteScheduler.step, fused."""
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        st = self._dk_state(sample.device)
        i = self._dk_host_index(timestep, st)
        if i is None:
            raise NotImplementedError("FusedLMSDiscreteScheduler needs a scalar timestep outside torch.compile (its "
                                      "multistep history and order are per loop)")
        p = self.config.prediction_type
        sigma = st.sig_host[i]
        x, m = sample, model_output
        # x0 = ax x + am m; the derivative (x - x0) / sigma = dx x + dm m (stock's conversions)
        if p == "epsilon":
            ax, am = 1.0, -sigma
            dx, dm = 0.0, 1.0
        elif p == "v_prediction":
            ax, am = 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
            dx, dm = (1 - ax) / sigma, -am / sigma
        else:  # "sample"
            ax, am = 0.0, 1.0
            dx, dm = 1 / sigma, -1 / sigma
        derivs = self.derivatives
        eff = min(i + 1, order)
        coeffs = self._dk_coeffs(st, order, i)
        # stock zips the coefficients with the newest derivatives first (a history shorter
        # than the order, after set_begin_index, uses the first len(history) coefficients)
        used = min(eff, len(derivs) + 1)
        hist = list(reversed(derivs[len(derivs) - (used - 1):])) if used > 1 else []
        c0 = coeffs[0]
        inputs = [x, m] + hist
        rows = [[1 + c0 * dx, c0 * dm] + [coeffs[j] for j in range(1, used)]]
        pad = [0.0] * len(hist)
        if p != "sample":
            rows.append([ax, am] + pad)
        if p != "epsilon":
            rows.append([dx, dm] + pad)
        outs = U.linear_step(inputs, rows)
        prev = outs[0]
        x0 = m if p == "sample" else outs[1]
        d = m if p == "epsilon" else outs[-1]
        derivs.append(d)
        if len(derivs) > order:
            derivs.pop(0)
        self._step_index += 1
        if not return_dict:
            return (prev, x0)
        return B.output(LMSDiscreteSchedulerOutput, prev, x0)
