"""Gaussian mixtures with exact density, sampling and (noise-perturbed) score."""

from __future__ import annotations

import math

import torch

from ..ops import gmm_annealed_langevin, gmm_score

__all__ = ["GaussianMixture", "classic_mixture", "uniform_box"]


class GaussianMixture:
    """``p(x) = sum_k w_k N(x; mu_k, diag(s_k^2))`` in D dimensions.

    Args:
        weights: (K,) non-negative, summing to 1. means: (K, D). stds: (K, D), (K,) or a float.

    All methods accept ``sigma``: the mixture convolved with N(0, sigma^2 I), i.e. each
    component's variance becomes ``s_k^2 + sigma^2`` (the perturbed densities that
    denoising score matching targets). The score is :func:`diffkern.gmm_score`.
    """

    def __init__(self, weights, means, stds=1.0, *, dtype=torch.float32, device=None):
        self.means = torch.as_tensor(means, dtype=dtype, device=device)
        if self.means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        K, D = self.means.shape
        self.weights = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
        if self.weights.numel() != K:
            raise ValueError(f"weights must have shape ({K},), got {tuple(self.weights.shape)}")
        if bool((self.weights < 0).any()) or abs(float(self.weights.sum()) - 1.0) > 1e-4:
            raise ValueError("weights must be non-negative and sum to 1")
        stds = torch.as_tensor(stds, dtype=dtype, device=device)
        if stds.dim() == 0:
            stds = stds.expand(K, D)
        elif stds.shape == (K,):
            stds = stds[:, None].expand(K, D)
        if stds.shape != (K, D):
            raise ValueError(f"stds must have shape ({K}, {D}) or ({K},), got {tuple(stds.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError("stds must be positive")
        self.stds = stds.contiguous()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def to(self, device=None, dtype=None) -> GaussianMixture:
        dtype = dtype or self.means.dtype
        return GaussianMixture(self.weights, self.means, self.stds, dtype=dtype,
                               device=device or self.means.device)

    def sample(self, n: int, *, sigma: float = 0.0, generator: torch.Generator | None = None,
               return_labels: bool = False):
        """``n`` exact samples (optionally perturbed by N(0, sigma^2 I)); component labels too if asked."""
        dev = self.means.device
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        labels = torch.multinomial(self.weights.to(gen_dev, torch.float64), n, replacement=True,
                                   generator=generator).to(dev)
        z = torch.randn(n, self.dim, generator=generator, device=gen_dev, dtype=self.means.dtype).to(dev)
        std = torch.sqrt(self.stds[labels] ** 2 + sigma * sigma)
        x = self.means[labels] + std * z
        return (x, labels) if return_labels else x

    def component_log_probs(self, x: torch.Tensor, *, sigma: float = 0.0) -> torch.Tensor:
        """(..., K): ``log w_k + log N(x; mu_k, s_k^2 + sigma^2)``."""
        var = self.stds.to(x.dtype) ** 2 + sigma * sigma
        diff = x[..., None, :] - self.means.to(x.dtype)
        return torch.log(self.weights.to(x.dtype)) - 0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1)

    def log_prob(self, x: torch.Tensor, *, sigma: float = 0.0) -> torch.Tensor:
        """(...,) exact log density at x (..., D)."""
        return torch.logsumexp(self.component_log_probs(x, sigma=sigma), dim=-1)

    def density(self, x: torch.Tensor, *, sigma: float = 0.0) -> torch.Tensor:
        return self.log_prob(x, sigma=sigma).exp()

    def responsibilities(self, x: torch.Tensor, *, sigma: float = 0.0) -> torch.Tensor:
        return torch.softmax(self.component_log_probs(x, sigma=sigma), dim=-1)

    def score(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Exact ``grad_x log p_sigma(x)`` via :func:`diffkern.gmm_score`."""
        return gmm_score(x, self.weights.to(x.dtype), self.means.to(x.dtype), self.stds.to(x.dtype), sigma)

    def annealed_langevin(self, x: torch.Tensor, sigmas, **kwargs) -> torch.Tensor:
        """The fused :func:`diffkern.gmm_annealed_langevin` on this mixture's exact score."""
        return gmm_annealed_langevin(x, self.weights.to(x.dtype), self.means.to(x.dtype), self.stds.to(x.dtype),
                                     sigmas, **kwargs)


def classic_mixture(*, dtype=torch.float32, device=None) -> GaussianMixture:
    """The classic 2-D test of NCSN: weights 0.8 / 0.2, means (5, 5) / (-5, -5), unit covariance."""
    return GaussianMixture([0.8, 0.2], [[5.0, 5.0], [-5.0, -5.0]], 1.0, dtype=dtype, device=device)


def uniform_box(n: int, dim: int = 2, low: float = -8.0, high: float = 8.0, *, generator=None, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """``n`` points uniform on ``[low, high]^dim`` (the classic test's start points: [-8, 8]^2)."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, dim, generator=generator, device=gen_dev, dtype=dtype)
    return (low + (high - low) * u).to(device or gen_dev)
