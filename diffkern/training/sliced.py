"""Score matching without the data score: exact (Jacobian trace) and sliced.

Hyvärinen's (2005) objective ``J(s) = E_p[ tr(d s / d x) + 0.5 ||s(x)||^2 ]`` equals
``0.5 E_p ||s - grad log p||^2`` up to a constant, so it needs samples of p only. Its
trace costs D backward passes; sliced score matching (Song, Garg, Shi & Ermon 2019)
replaces it by random projections ``v`` with ``E[v v^T] = I``:

    SSM:     E_v[ v^T (d s / d x) v + 0.5 (v^T s)^2 ]
    SSM-VR:  E_v[ v^T (d s / d x) v ] + 0.5 ||s||^2      (the norm term exactly)

both unbiased for ``J``; ``v^T (ds/dx) v = v . grad_x (v . s)`` is one extra backward pass
(double backprop: the graph is kept so the loss can itself be differentiated).

Noise-conditional models (``model(x, sigma)``, e.g. :class:`~diffkern.models.ScoreNet`):
with ``sigmas`` given, each sample gets a level sigma drawn from the set and the point
``x + sigma z``, a sample of the perturbed density p_sigma, and the objective is weighted
by ``sigma^2`` (NCSN's weighting). The target is then the score of p_sigma, the same one
denoising score matching (:func:`~diffkern.training.dsm_loss`) learns: for each sigma the
weighted objective is DSM's up to a constant, which makes the two comparable step for step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["sliced_score_matching_loss", "exact_score_matching_loss", "SlicedScoreMatchingLoss", "PROJECTIONS"]

PROJECTIONS = ("gaussian", "rademacher")


def _gen_device(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _perturb(x, sigmas, generator):
    """(points, sigma per point or None): x itself, or x + sigma z with sigma drawn from the
    set, in the order :func:`~diffkern.training.dsm_loss` draws them."""
    if sigmas is None:
        return x, None
    B = x.shape[0]
    gd = _gen_device(generator)
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if not bool((s > 0).all()):
        raise ValueError("sigmas must be positive")
    idx = torch.randint(0, s.numel(), (B,), generator=generator, device=gd)
    sigma = s[idx.cpu()].to(x.device, x.dtype)
    z = torch.randn(x.shape, generator=generator, device=gd, dtype=x.dtype).to(x.device)
    return x + sigma.reshape((B,) + (1,) * (x.dim() - 1)) * z, sigma


def _call(model, x, sigma):
    return model(x) if sigma is None else model(x, sigma)


def _reduce(per, sigma, reduction):
    if sigma is not None:
        per = per * (sigma * sigma).to(per.dtype)
    return per.mean() if reduction == "mean" else per


def sliced_score_matching_loss(model, x: torch.Tensor, sigmas=None, *, n_projections: int = 1,
                               projection: str = "rademacher", variance_reduced: bool = True,
                               reduction: str = "mean", generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced score matching of ``model`` on the samples ``x`` (B, ...).

    ``n_projections`` (M) vectors per sample, ``projection`` ``"gaussian"`` (N(0, I)) or
    ``"rademacher"`` (+-1 entries: the same mean, a smaller variance of ``v^T J v``, which
    is the trace estimator of Hutchinson 1989). ``variance_reduced=True`` is SSM-VR (the
    ``0.5 ||s||^2`` term exact), else SSM. ``sigmas``: None for an unconditional
    ``model(x)``, else a float or 1-D set for ``model(x, sigma)`` on perturbed points,
    sigma^2-weighted (module docstring). The batch is repeated M times and run as one
    forward and one double-backward pass.

    ``reduction="mean"``: a scalar; ``"none"``: (M, B), one unbiased estimate of the
    per-sample objective per projection (the test uses these to check unbiasedness)."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B, M = x.shape[0], int(n_projections)
    points, sigma = _perturb(x, sigmas, generator)
    rep = (M,) + (1,) * (x.dim() - 1)
    xr = points.detach().repeat(rep).requires_grad_(True)
    sr = sigma.repeat(M) if sigma is not None else None
    gd = _gen_device(generator)
    if projection == "gaussian":
        v = torch.randn(xr.shape, generator=generator, device=gd, dtype=x.dtype)
    else:
        v = torch.randint(0, 2, xr.shape, generator=generator, device=gd).to(x.dtype) * 2 - 1
    v = v.to(x.device)
    with torch.enable_grad():
        s = _call(model, xr, sr)
        sv = (s * v).reshape(M * B, -1).sum(1)
        (jv,) = torch.autograd.grad(sv.sum(), xr, create_graph=True)
        vjv = (jv * v).reshape(M * B, -1).sum(1)
        norm = 0.5 * (s * s).reshape(M * B, -1).sum(1) if variance_reduced else 0.5 * sv * sv
        per = (vjv + norm).reshape(M, B)
    if reduction == "mean":
        return _reduce(per.mean(0), sigma, "mean")
    return _reduce(per, sigma, "none")


def exact_score_matching_loss(model, x: torch.Tensor, sigmas=None, *, reduction: str = "mean",
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Hyvärinen's objective ``tr(ds/dx) + 0.5 ||s||^2`` with the trace computed exactly
    (one backward pass per dimension; for small D and for checking the sliced estimates).
    ``sigmas`` and ``generator`` as in :func:`sliced_score_matching_loss` (the same draws
    for the perturbed points). ``reduction="none"`` gives (B,)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B = x.shape[0]
    points, sigma = _perturb(x, sigmas, generator)
    xr = points.detach().requires_grad_(True)
    with torch.enable_grad():
        s = _call(model, xr, sigma)
        flat = s.reshape(B, -1)
        D = flat.shape[1]
        trace = torch.zeros(B, dtype=s.dtype, device=s.device)
        for d in range(D):
            (g,) = torch.autograd.grad(flat[:, d].sum(), xr, create_graph=True)
            trace = trace + g.reshape(B, -1)[:, d]
        per = trace + 0.5 * (flat * flat).sum(1)
    return _reduce(per, sigma, reduction)


@dataclass
class SlicedScoreMatchingLoss:
    """:func:`sliced_score_matching_loss` as a trainer objective."""
    sigmas: object = None
    n_projections: int = 1
    projection: str = "rademacher"
    variance_reduced: bool = True

    def __call__(self, model, x, y, generator):
        return sliced_score_matching_loss(model, x, self.sigmas, n_projections=self.n_projections,
                                          projection=self.projection, variance_reduced=self.variance_reduced,
                                          generator=generator)
