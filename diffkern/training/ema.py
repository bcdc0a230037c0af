"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """``ema <- d * ema + (1 - d) * weights`` after every optimizer step.

    With ``warmup=True`` the decay is ``min(decay, (1 + n) / (10 + n))`` after n updates
    (as in TensorFlow's ExponentialMovingAverage with ``num_updates``), so a short run's
    average is not dominated by the random initialisation. Buffers (e.g. norm statistics)
    are copied, not averaged. ``ema.model`` is a frozen copy in eval mode to sample from.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("model does not match the EMA's architecture")
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
