"""Sinusoidal embeddings of a scalar condition (a timestep or log sigma)."""

from __future__ import annotations

import math

import torch

__all__ = ["sinusoidal_embedding"]


def sinusoidal_embedding(values: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style features of ``values`` (shape (B,) or ()), as in DDPM / diffusers'
    ``get_timestep_embedding`` with ``flip_sin_to_cos=True``:
    ``[cos(v f_0), ..., cos(v f_{h-1}), sin(v f_0), ...]`` with ``f_i = max_period**(-i/h)``,
    ``h = dim // 2``; an odd ``dim`` gets one zero column. Returns (B, dim) float32."""
    v = values.reshape(-1).to(torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    args = v[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
