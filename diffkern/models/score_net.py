"""An MLP score model ``s(x, sigma)`` for low-dimensional data (NCSN-style conditioning)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .embeddings import sinusoidal_embedding

__all__ = ["ScoreNet"]


class ScoreNet(nn.Module):
    """``s(x, sigma) = f(x / sqrt(sigma^2 + data_std^2), log sigma) / sigma``.

    The input is rescaled so that ``x`` perturbed at any sigma reaches the network at
    unit-ish scale, and the output is divided by sigma as in NCSN (Song & Ermon 2020,
    technique 3): the optimal ``f`` is then ``sigma * score`` of the perturbed data, whose
    scale hardly depends on sigma. ``log sigma`` enters the input and, through a sinusoidal
    embedding, every hidden layer.

    Args:
        dim: data dimension D. hidden: width. depth: hidden layers.
        data_std: rough scale of the data (per coordinate), for the input rescaling.
        embed_dim: size of the sigma embedding.

    ``forward(x, sigma)``: ``x`` (B, D); ``sigma`` a float, a 0-d tensor or a (B,) tensor.
    Returns (B, D), the estimated score of the data perturbed by N(0, sigma^2 I).
    """

    def __init__(self, dim: int = 2, *, hidden: int = 128, depth: int = 3, data_std: float = 1.0, embed_dim: int = 32):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.config = dict(dim=dim, hidden=hidden, depth=depth, data_std=data_std, embed_dim=embed_dim)
        self.dim = dim
        self.data_std = float(data_std)
        self.embed_dim = embed_dim
        self.sigma_mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim + 1, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.emb_proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    @classmethod
    def from_config(cls, config: dict) -> ScoreNet:
        return cls(**config)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1).expand(B) if sigma.numel() == 1 else sigma.reshape(B)
        if sigma.device.type == "cpu" and not bool(torch.all(sigma > 0)):  # no host sync on accelerators
            raise ValueError("sigma must be positive")
        log_sigma = sigma.log()
        x_in = x / torch.sqrt(sigma * sigma + self.data_std**2)[:, None]
        # Scale log sigma so that sigma in ~[1e-3, 1e2] spans a few radians of the embedding.
        emb = self.sigma_mlp(sinusoidal_embedding(log_sigma * (4.0 / math.log(10.0)), self.embed_dim,
                                                  max_period=100.0).to(x.dtype))
        h = self.act(self.inp(torch.cat([x_in, log_sigma[:, None]], dim=1)) + self.emb_proj[0](emb))
        for layer, proj in zip(self.layers, self.emb_proj[1:], strict=True):
            h = self.act(layer(h) + proj(emb))
        return self.out(h) / sigma[:, None]
