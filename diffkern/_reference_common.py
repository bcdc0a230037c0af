"""What the two reference modules (reference.py: DDPM/DDIM/q_sample/Langevin;
reference_samplers.py: the sampler families) share: the dtype of the math, the per-sample
broadcast, the schedule lookup and the noise draw. Its own module so that reference.py can
export the families' ops without the two importing each other."""

from __future__ import annotations

import torch

from . import _rng


def _compute_dtype(x) -> torch.dtype:
    dt = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dt == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A validated level or timestep -> broadcastable against x: (B,) or (1,) -> (B or 1,
    1, ..., 1), aligned with x's first dim; 0-d and ndim >= 2 (already in torch's
    right-aligned layout, _validate.level_shape) as they are."""
    if v.dim() != 1:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1))) if x.dim() > 0 else v.reshape(())


def _lookup(table: torch.Tensor, t: torch.Tensor, allow_final: bool) -> torch.Tensor:
    """alphas_cumprod[t] in float64; 1.0 where t < 0 (the final step) if allow_final; NaN
    where t is out of range (only possible for device-resident t, never checked on host)."""
    T = table.numel()
    valid = (t >= 0) & (t < T) if not allow_final else (t < T)
    ab = table.to(torch.float64)[t.clamp(0, T - 1)]
    if allow_final:
        ab = torch.where(t < 0, torch.ones_like(ab), ab)
    return torch.where(valid, ab, torch.full_like(ab, float("nan")))


def _draw(x: torch.Tensor, generator, dtype=None) -> torch.Tensor:
    return _rng.normal_like(x.shape, generator, x.device, _compute_dtype(dtype or x.dtype))
