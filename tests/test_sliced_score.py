"""Sliced score matching: unbiased for Hyvärinen's objective (exact Jacobian trace), its
variance-reduced form, and training a ScoreNet on the 2-D mixture with it."""

from __future__ import annotations

import math

import pytest
import torch

from diffkern.data import classic_mixture
from diffkern.models import ScoreNet
from diffkern.training import (
    exact_score_matching_loss,
    geometric_sigmas,
    sliced_score_matching_loss,
    train_sliced_score,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class MLPScore(torch.nn.Module):
    """A small nonlinear unconditional score model s(x), float64."""

    def __init__(self, dim=3, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, dim)).double()

    def forward(self, x):
        return self.net(x)


def test_exact_loss_of_a_linear_score():
    """s(x) = A x + b: the trace is tr A at every x."""
    D = 4
    A, b = torch.randn(D, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    x = torch.randn(50, D, dtype=torch.float64)
    per = exact_score_matching_loss(lambda y: y @ A.T + b, x, reduction="none")
    expected = torch.trace(A) + 0.5 * ((x @ A.T + b) ** 2).sum(1)
    torch.testing.assert_close(per, expected)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
@pytest.mark.parametrize("variance_reduced", [True, False])
def test_sliced_loss_is_unbiased_for_the_exact_loss(projection, variance_reduced):
    model = MLPScore()
    x = 1.5 * torch.randn(32, 3, dtype=torch.float64)
    exact = float(exact_score_matching_loss(model, x).detach())
    M = 4000
    per = sliced_score_matching_loss(model, x, n_projections=M, projection=projection,
                                     variance_reduced=variance_reduced, reduction="none",
                                     generator=torch.Generator().manual_seed(1))
    assert per.shape == (M, 32)
    est = per.mean(1)  # one unbiased estimate of the batch objective per projection
    mean, se = float(est.mean()), float(est.std() / math.sqrt(M))
    print(f"\n{projection} VR={variance_reduced}: {mean:.5f} +- {se:.5f} vs exact {exact:.5f}")
    assert se > 0
    assert abs(mean - exact) < 3 * se
    # The same statistic would see a bias of a few percent of the trace term.
    trace = float((exact_score_matching_loss(model, x) - 0.5 * (model(x) ** 2).sum(1).mean()).detach())
    assert 0.05 * abs(trace) > 3 * se


def test_projection_variance_matches_hutchinson():
    """In SSM-VR only ``v^T J v`` is random: its variance over projections is
    ``2 ||J_sym||_F^2`` for Gaussian v and ``2 (||J_sym||_F^2 - sum_i J_ii^2)`` for
    Rademacher v (Hutchinson 1989), so Rademacher is never worse. (Plain SSM's extra
    ``0.5 (v^T s)^2`` term covaries with it by ``2 s^T J s``, which is negative where the
    score points inwards: variance reduction is not guaranteed there, hence not tested.)"""
    model = MLPScore(seed=2)
    x = torch.randn(64, 3, dtype=torch.float64)
    J = torch.func.vmap(torch.func.jacrev(model))(x)  # (B, D, D)
    sym = 0.5 * (J + J.transpose(1, 2))
    fro2 = (sym**2).sum((1, 2))
    expected = {"gaussian": 2 * fro2, "rademacher": 2 * (fro2 - (torch.diagonal(J, dim1=1, dim2=2) ** 2).sum(1))}
    for projection, var in expected.items():
        per = sliced_score_matching_loss(model, x, n_projections=4000, projection=projection, reduction="none",
                                         generator=torch.Generator().manual_seed(3))
        got = float(per.detach().var(0).mean())
        assert got == pytest.approx(float(var.mean()), rel=0.05), projection
    assert float(expected["rademacher"].mean()) < float(expected["gaussian"].mean())


def test_noise_conditional_sliced_loss_matches_exact_on_the_same_perturbed_points():
    torch.manual_seed(0)
    net = ScoreNet(2, hidden=32, depth=2, data_std=4.0).double()
    x = classic_mixture(dtype=torch.float64).sample(24, generator=torch.Generator().manual_seed(0))
    sigmas = geometric_sigmas(5.0, 0.5, 4)
    exact = float(exact_score_matching_loss(net, x, sigmas, generator=torch.Generator().manual_seed(7)).detach())
    M = 3000
    per = sliced_score_matching_loss(net, x, sigmas, n_projections=M, reduction="none",
                                     generator=torch.Generator().manual_seed(7))
    est = per.mean(1)
    mean, se = float(est.mean()), float(est.std() / math.sqrt(M))
    assert abs(mean - exact) < 3 * se
    # Double backprop: the loss has parameter gradients (through the Jacobian term too).
    loss = sliced_score_matching_loss(net, x, sigmas, n_projections=2, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_ssm_trains_a_scorenet_on_the_mixture():
    mix = classic_mixture()
    train = mix.sample(5000, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    sigma = 3.0
    tr = train_sliced_score(ScoreNet(2, hidden=64, data_std=4.0), train, sigma, n_steps=300, batch_size=256, lr=3e-3,
                            progress=False)
    xs = torch.linspace(-10, 10, 31)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        est, true = tr.ema.model(grid, sigma), mix.score(grid, sigma)
    w = mix.density(grid, sigma=sigma)
    rel = float(((((est - true) ** 2).sum(1) * w).sum() / ((true**2).sum(1) * w).sum()).sqrt())
    print(f"\nSSM-VR, 300 steps at sigma={sigma}: density-weighted relative L2 {rel:.4f}")
    assert rel < 0.15


def test_sliced_bad_inputs():
    model = MLPScore()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="projection"):
        sliced_score_matching_loss(model, x, projection="sphere")
    with pytest.raises(ValueError, match="n_projections"):
        sliced_score_matching_loss(model, x, n_projections=0)
    with pytest.raises(ValueError, match="sigmas"):
        sliced_score_matching_loss(lambda y, s: y, x, [1.0, -1.0])
