"""Flow matching: sigma sampling, the loss minimiser on a Gaussian toy (the known marginal
velocity field), training a small model to it, and the trainer's resume."""

from __future__ import annotations

import math

import pytest
import torch

import diffkern as dk
from diffkern.models import UNet
from diffkern.training import (
    FlowMatchingLoss,
    VelocityModel,
    flow_matching_loss,
    load_model,
    sample_flow_sigmas,
    train_flow,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = 0.5  # data N(MU, S^2 I)


def exact_velocity(x, sigma):
    """E[noise - x0 | x_t = x] for x0 ~ N(MU, S^2 I), x_t = (1 - sigma) x0 + sigma noise:
    ``-MU + c (x - (1 - sigma) MU)``, ``c = (sigma - (1 - sigma) S^2) / ((1 - sigma)^2 S^2 + sigma^2)``."""
    sigma = sigma.reshape(-1, 1).to(x.dtype)
    c = (sigma - (1 - sigma) * S**2) / ((1 - sigma) ** 2 * S**2 + sigma**2)
    return -MU.to(x.dtype) + c * (x - (1 - sigma) * MU.to(x.dtype))


def gaussian_data(n, seed=0):
    return MU + S * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_flow_q_sample_path_and_target():
    x0 = torch.randn(6, 3, dtype=torch.float64)
    sigma = torch.rand(6, dtype=torch.float64)
    x_t, noise = dk.flow_q_sample(x0, sigma, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_t, (1 - sigma[:, None]) * x0 + sigma[:, None] * noise)
    # A model that knows x0 returns (x_t - x0) / sigma = noise - x0: the loss vanishes, so
    # the loss feeds the model the x_t and sigma * time_scale that q_sample used.
    loss = flow_matching_loss(lambda x, t: (x - x0) / (t / 1000.0)[:, None], x0,
                              generator=torch.Generator().manual_seed(1))
    assert float(loss) < 1e-12
    assert float(flow_matching_loss(lambda x, t: x - x0, x0, generator=torch.Generator().manual_seed(1))) > 0.1


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sigma_sampling(sampling):
    n = 200000
    s = sample_flow_sigmas(n, sampling=sampling, logit_mean=0.3, logit_std=0.8,
                           generator=torch.Generator().manual_seed(0)).double()
    assert s.shape == (n,) and float(s.min()) >= 0 and float(s.max()) <= 1
    if sampling == "uniform":
        assert float(s.mean()) == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / n))
        assert float(s.var()) == pytest.approx(1 / 12, rel=0.01)
    else:
        logit = torch.log(s / (1 - s))
        assert float(logit.mean()) == pytest.approx(0.3, abs=5 * 0.8 / math.sqrt(n))
        assert float(logit.std()) == pytest.approx(0.8, rel=0.01)
    with pytest.raises(ValueError, match="sampling"):
        sample_flow_sigmas(3, sampling="beta")


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_the_loss_is_stationary_at_the_exact_velocity_only(sampling):
    """The flow-matching loss is quadratic in v with minimiser E[noise - x0 | x_t]: its
    derivative along any perturbation field delta vanishes at the exact velocity. Per
    sample, ``(l(v + h delta) - l(v - h delta)) / 2h = 2 delta . (v - target) / D``; its mean is
    zero within 3 standard errors for the exact field and clearly not for wrong fields."""
    x0 = gaussian_data(100000)
    time_scale = 1000.0
    deltas = {"const": lambda x, s: torch.ones_like(x), "x": lambda x, s: x, "sigma*x": lambda x, s: s[:, None] * x}

    def derivative(velocity, delta):
        def model(h):
            return lambda x, t: velocity(x, t / time_scale) + h * delta(x, t / time_scale)

        h = 1e-3
        per = [flow_matching_loss(model(sign * h), x0, sigma_sampling=sampling, time_scale=time_scale,
                                  reduction="none", generator=torch.Generator().manual_seed(5)) for sign in (1, -1)]
        d = (per[0] - per[1]) / (2 * h)
        return float(d.mean()), float(d.std() / math.sqrt(len(d)))

    for name, delta in deltas.items():
        mean, se = derivative(exact_velocity, delta)
        assert abs(mean) < 3 * se, (name, mean, se)

    def wrong_scale(x, s):  # the exact field for data std 0.6 instead of 0.5
        s = s.reshape(-1, 1)
        c = (s - (1 - s) * 0.36) / ((1 - s) ** 2 * 0.36 + s**2)
        return -MU + c * (x - (1 - s) * MU)

    for wrong in (wrong_scale, lambda x, s: exact_velocity(x, s) + 0.05):
        worst = max(abs(m) / se for m, se in (derivative(wrong, d) for d in deltas.values()))
        assert worst > 10


class MLPVelocity(torch.nn.Module):
    def __init__(self, dim=2, hidden=64):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, (t / 1000.0)[:, None].to(x.dtype)], 1))


def test_training_recovers_the_exact_velocity_field():
    data = gaussian_data(20000).float()
    torch.manual_seed(0)
    tr = train_flow(MLPVelocity(), data, n_steps=400, batch_size=256, lr=1e-2, warmup_steps=20, ema_decay=0.98,
                    sigma_sampling="uniform", progress=False)
    model = VelocityModel(tr.ema.model)
    g = torch.Generator().manual_seed(9)
    sigma = torch.rand(4000, generator=g) * 0.9 + 0.05
    x_t, _ = dk.flow_q_sample(gaussian_data(4000, seed=3).float(), sigma, generator=g)
    with torch.no_grad():
        est = model(x_t, sigma).double()
    true = exact_velocity(x_t.double(), sigma.double())
    rel = float((est - true).norm() / true.norm())
    # For scale: the exact field of data with std 0.6 instead of 0.5 is 0.069 away.
    print(f"\nflow matching, 400 steps: relative L2 of the learned velocity {rel:.4f}")
    assert rel < 0.05
    h = torch.tensor(tr.loss_history)
    assert float(h[-50:].mean()) < 0.5 * float(h[:10].mean())


def test_train_flow_resume_and_load(tmp_path):
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    kw = dict(batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, seed=1, progress=False)
    torch.manual_seed(0)
    straight = train_flow(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=6, **kw)
    path = tmp_path / "flow.pt"
    torch.manual_seed(0)
    train_flow(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=3, checkpoint_path=path, **kw)
    torch.manual_seed(0)
    resumed = train_flow(UNet(1, base_channels=8, num_res_blocks=1), images, n_steps=6, checkpoint_path=path, **kw)
    assert straight.loss_history == resumed.loss_history
    for pa, pb in zip(straight.ema.model.parameters(), load_model(path).parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert isinstance(resumed.loss_fn, FlowMatchingLoss) and resumed.loss_fn.time_scale == 1000.0
    labels = torch.arange(40) % 3
    cond = train_flow(UNet(1, base_channels=8, num_res_blocks=1, num_classes=3), images, labels=labels, n_steps=2,
                      **kw)
    assert all(math.isfinite(v) for v in cond.loss_history)
