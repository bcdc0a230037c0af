"""FusedIPNDMScheduler: IPNDMScheduler with one dk.linear_step per step."""

from __future__ import annotations

import torch
from diffusers import IPNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import unchecked as U
from . import _base as B

__all__ = ["FusedIPNDMScheduler"]

# Adams-Bashforth weights on (e_new, e_-1, e_-2, e_-3), by the history length (stock's)
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _rows(a: float, b: float, na: float, nb: float, order: int):
    """Rows over (x, m, e_-1, ..., e_-(order-1)) of prev and of the new history entry.

    e = b x + a m; E = sum_j w_j e_j; prev = na (x - b E) / max(a, 1e-8) + nb E, expanded
    so that each input's coefficient is formed once (stock's first step has a = 0, where
    x - b E cancels exactly: here too, as 1 - b w0 b = 0)."""
    w = _AB[order]
    r = na / max(a, 1e-8)
    prev = [r * (1 - b * w[0] * b) + nb * w[0] * b, (nb - r * b) * w[0] * a]
    prev += [(nb - r * b) * wj for wj in w[1:]]
    ets = [b, a] + [0.0] * (order - 1)
    return (tuple(prev), tuple(ets))


class FusedIPNDMScheduler(B.IndexedSchedulerMixin, IPNDMScheduler):
    """:class:`diffusers.IPNDMScheduler` with one fused pass per step: the step and the
    history entry ``b x + a m`` are the two rows of one ``linear_step`` call over
    (x, model_output, the last up to 3 history entries), with the Adams-Bashforth weights
    folded into coefficients formed in float64 from stock's float32 ``alphas`` / ``betas``
    (tables per position and order, built in ``set_timesteps``). ``ets`` keeps the last 4
    entries (stock keeps all; it reads only the last 4). Every config is supported. A (B,)
    timestep (or torch.compile) finds each sample's position on the device; the order is
    the shared history's length, as stock's."""

    def _dk_check_config(self):
        pass

    def _dk_build(self, device):
        ts = self.timesteps.detach().to("cpu", torch.float32)
        vals = ts.tolist()
        where: dict = {}
        for k, v in enumerate(vals):
            where.setdefault(v, []).append(k)
        init = [where[v][1] if len(where[v]) > 1 else where[v][0] for v in vals]
        al = self.alphas.detach().to("cpu", torch.float32).tolist()
        be = self.betas.detach().to("cpu", torch.float32).tolist()
        n = len(vals)
        host = {o: [_rows(al[i], be[i], al[i + 1], be[i + 1], o) for i in range(n)] for o in _AB}
        return B._State(ts_dev=B.const_tensor(ts, device, torch.float32), n=n, init_index=init, host=host,
                        dev={o: B.const_tensor(h, device, torch.float64) for o, h in host.items()})

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """IPNDMScheduler.step, fused; ``timestep`` may be a (B,) tensor."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        x, m = B.promote(sample, model_output)
        st = self._dk_state(x.device)
        order = min(len(self.ets) + 1, 4)
        hist = self.ets[len(self.ets) - order + 1:][::-1] if order > 1 else []
        i = self._dk_host_index(timestep, st)
        if i is not None:
            coeffs = st.host[order][i]
        else:
            idx, valid = self._dk_positions(timestep, x, st)
            v = st.dev[order].index_select(0, idx)
            coeffs = torch.where(valid.reshape(-1, 1, 1), v, torch.full_like(v, float("nan")))
        prev, e = U.linear_step([x, m, *hist], coeffs)
        self.ets.append(e)
        if len(self.ets) > 4:
            del self.ets[0]
        if i is not None:
            self._step_index += 1
        if not return_dict:
            return (prev,)
        return B.output(SchedulerOutput, prev)
