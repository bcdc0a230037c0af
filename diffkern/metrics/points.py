"""Sample-quality metrics for low-dimensional point clouds, with thresholds calibrated on
pairs of independent samples from the true distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["mode_weights", "sliced_wasserstein", "mmd_rbf", "Calibration", "calibrate"]


def mode_weights(x: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of the points ``x`` (N, D) nearest to each of ``means`` (K, D), and its
    binomial standard error ``sqrt(w (1 - w) / N)``. Returns two float64 (K,) tensors."""
    x = x.detach().to(torch.float64)
    means = torch.as_tensor(means).detach().to(x.device, torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite points")
    nearest = torch.cdist(x, means).argmin(dim=1)
    n = x.shape[0]
    w = torch.bincount(nearest, minlength=means.shape[0]).to(torch.float64) / n
    return w.cpu(), (w * (1 - w) / n).sqrt().cpu()


def _quantiles(v: torch.Tensor, m: int) -> torch.Tensor:
    """(P, n) sorted projections -> (P, m) values at the m mid-point quantile levels."""
    n = v.shape[1]
    if n == m:
        return v
    pos = (torch.arange(m, dtype=v.dtype, device=v.device) + 0.5) / m * n - 0.5
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    return v[:, lo] * (1 - frac) + v[:, hi] * frac


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, n_projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None) -> float:
    """Sliced p-Wasserstein distance ``(E_theta W_p^p(theta.x, theta.y))^(1/p)`` over
    ``n_projections`` random unit directions; 1-D distances between the empirical quantile
    functions (sizes may differ). ``generator`` fixes the directions."""
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    y = y.detach().to(x.device, torch.float64).reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    theta = torch.randn(n_projections, x.shape[1], generator=generator, device=gen_dev, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    px, _ = (theta @ x.T).sort(dim=1)
    py, _ = (theta @ y.T).sort(dim=1)
    m = max(px.shape[1], py.shape[1])
    diff = (_quantiles(px, m) - _quantiles(py, m)).abs() ** p
    return float(diff.mean() ** (1.0 / p))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, *, bandwidths=None) -> float:
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-|a-b|^2 / (2 h^2))``.

    ``bandwidths`` default: the median pairwise distance of the pooled sample times
    (0.5, 1, 2), which covers the scale of a mixture's components and of its spread."""
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    y = y.detach().to(x.device, torch.float64).reshape(y.shape[0], -1)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least two points in each sample")
    dxx, dyy, dxy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    if bandwidths is None:
        pooled = torch.cat([x, y])[:2000]
        med = torch.cdist(pooled, pooled).median().clamp_min(1e-12)
        bandwidths = [0.5 * float(med), float(med), 2.0 * float(med)]
    total = 0.0
    for h in bandwidths:
        g = 1.0 / (2.0 * float(h) ** 2)
        kxx, kyy, kxy = torch.exp(-g * dxx), torch.exp(-g * dyy), torch.exp(-g * dxy)
        total += ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                  + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return float(total)


@dataclass
class Calibration:
    """The null distribution of a two-sample metric (values between two independent true
    samples of size ``n``) and the threshold derived from it: a sample "passes" when its
    metric against a true sample is at most ``threshold``."""
    null_values: torch.Tensor
    threshold: float
    n: int

    def passes(self, value: float) -> bool:
        return float(value) <= self.threshold


def calibrate(metric, sample_true, n: int, *, repeats: int = 20, quantile: float = 0.95, margin: float = 1.5,
              generator: torch.Generator | None = None) -> Calibration:
    """Threshold for ``metric(a, b)`` from ``repeats`` pairs of independent true samples:
    ``threshold = margin * quantile_q(null values)``, floored at a tiny positive number.

    ``sample_true(n, generator)`` draws n true points. A generated sample of the same size
    is then judged by ``calibration.passes(metric(generated, sample_true(n, g)))``."""
    vals = torch.tensor([float(metric(sample_true(n, generator), sample_true(n, generator))) for _ in range(repeats)],
                        dtype=torch.float64)
    thr = float(margin * torch.quantile(vals, quantile))
    return Calibration(vals, max(thr, 1e-12), n)
