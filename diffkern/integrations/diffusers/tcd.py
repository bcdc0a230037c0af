"""FusedTCDScheduler: TCDScheduler with one dk.linear_step per step."""

from __future__ import annotations

import math

import torch
from diffusers import TCDScheduler
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedTCDScheduler"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _div(p: float, q: float) -> float:
    """p / q with IEEE results at q = 0 (stock divides tensors there: inf / nan, no error)."""
    if q == 0:
        return math.nan if p == 0 else math.copysign(math.inf, p)
    return p / q


def _sqrt(v: float) -> float:
    """sqrt with stock's tensor result (nan) below 0."""
    return math.sqrt(v) if v >= 0 else math.nan


def _x0_eps_rows(a: float, prediction: str):
    """(x0, eps) as rows over (x, m) at alphas_cumprod a."""
    ra, rb = _sqrt(a), _sqrt(1 - a)
    if prediction == "epsilon":
        return (_div(1, ra), _div(-rb, ra)), (0.0, 1.0)
    if prediction == "sample":
        return (0.0, 1.0), (_div(1, rb), _div(-ra, rb))
    return (ra, -rb), (rb, ra)


class FusedTCDScheduler(B.IndexedSchedulerMixin, TCDScheduler):
    """:class:`diffusers.TCDScheduler` with one fused pass per step: the step and its
    ``pred_noised_sample`` are the two rows of one ``linear_step`` call (noise on the
    first row only, stock's ``randn_tensor`` numbers), coefficients formed in float64
    from stock's float32 ``alphas_cumprod`` and stock's float32 ``timestep_s`` rounding,
    once per ``set_timesteps`` and ``eta``. Every config stock accepts is supported (stock's
    step reads neither ``clip_sample`` nor ``thresholding``). A (B,) timestep (or
    torch.compile) finds each sample's position on the device; a sample at the last
    position takes no noise, as stock's last step."""

    def _dk_check_config(self):
        p = self.config.prediction_type
        if p not in _PREDICTIONS:
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample` or `v_prediction` "
                             "for `TCDScheduler`.")

    def _dk_build(self, device):
        ts = self.timesteps.detach().to("cpu", torch.int64)
        vals = ts.tolist()
        where: dict = {}
        for k, v in enumerate(vals):
            where.setdefault(v, []).append(k)
        init = [where[v][1] if len(where[v]) > 1 else where[v][0] for v in vals]
        return B._State(ts_dev=B.const_tensor(ts, device, torch.int64), n=len(vals), init_index=init, ts_host=vals,
                        ac_host=self.alphas_cumprod.to("cpu", torch.float32).tolist(),
                        final=float(self.final_alpha_cumprod), device=device,
                        table=B.const_tensor(self.alphas_cumprod.to("cpu", torch.float32), device, torch.float32),
                        by_eta={})

    def _dk_coeffs(self, st, eta: float):
        """Per position: ((prev row, noised row), (prev noise coefficient, 0)), host lists
        and device tables, for this eta."""
        got = st.by_eta.get(eta)
        if got is not None:
            return got
        n, ts, ac = st.n, st.ts_host, st.ac_host
        prev_ts = [ts[k + 1] if k + 1 < n else 0 for k in range(n)]
        # stock's float32 rounding of (1 - eta) * t_prev
        s_ts = torch.floor((1 - eta) * torch.tensor(prev_ts, dtype=torch.int64)).to(dtype=torch.long).tolist()
        last = self.num_inference_steps - 1
        pred = self.config.prediction_type
        rows, noise = [], []
        for k in range(n):
            a_t, a_s = ac[ts[k]], ac[s_ts[k]]
            pt = prev_ts[k]
            a_prev = ac[pt] if pt >= 0 else st.final
            (x0x, x0m), (ex, em) = _x0_eps_rows(a_t, pred)
            rs, rq = _sqrt(a_s), _sqrt(1 - a_s)
            noised = (rs * x0x + rq * ex, rs * x0m + rq * em)
            if eta > 0 and k != last:
                c = _div(a_prev, a_s)
                cp, cz = _sqrt(c), _sqrt(1 - c)
            else:
                cp, cz = 1.0, 0.0
            rows.append(((cp * noised[0], cp * noised[1]), noised))
            noise.append((cz, 0.0))
        got = st.by_eta[eta] = (rows, noise, B.const_tensor(rows, st.device, torch.float64),
                                B.const_tensor(noise, st.device, torch.float64))
        return got

    def step(self, model_output, timestep, sample, eta: float = 0.3, generator=None, return_dict: bool = True,
             variance_noise=None):
        """TCDScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        assert 0 <= eta <= 1.0, "gamma must be less than or equal to 1.0"
        x, m = B.promote(sample, model_output)
        st = self._dk_state(x.device)
        rows, noise_rows, rows_dev, noise_dev = self._dk_coeffs(st, float(eta))
        i = self._dk_host_index(timestep, st)
        if i is not None:
            coeffs, nc = rows[i], noise_rows[i]
            draws = nc[0] != 0
        else:
            idx, valid = self._dk_positions(timestep, x, st)
            keep = valid.reshape(-1, 1, 1)
            coeffs = torch.where(keep, rows_dev.index_select(0, idx), torch.full_like(rows_dev[:1], float("nan")))
            nc = noise_dev.index_select(0, idx)
            draws = eta > 0
        z, gen = B.step_noise(self, x, generator, variance_noise, draws, shape=tuple(m.shape))
        prev, noised = U.linear_step([x, m], coeffs, nc if draws else None, z, gen)
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev, noised)
        return B.output(TCDSchedulerOutput, prev, noised)

    def add_noise(self, original_samples, noise, timesteps):
        """TCDScheduler.add_noise (dk.q_sample, coefficients in float32)."""
        x0, z = B.promote(original_samples, noise)
        st = self._dk_state(x0.device)
        return U.q_sample(x0, B.timestep_tensor(timesteps, x0), st.table, z)[0]
