"""Truncated (early-stopped) DDPM / DDIM chains: ``x_start`` noised to ``t_start``, then the
reverse chain from there (ES-DDPM, SDEdit)."""

from __future__ import annotations

import pytest
import torch

import diffkern as dk
from diffkern import samplers
from diffkern.data import load_digits
from diffkern.models import PixelGaussian, UNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    model = UNet(1, base_channels=8, num_res_blocks=1).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero-initialised output layers would make eps = 0
        for p in model.parameters():
            if bool((p == 0).all()):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.ts = model, []

    def forward(self, x, t):
        self.ts.append(int(t[0]))
        return self.model(x, t)


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction E[eps | x_t] for data N(mean, std^2) per pixel:
    ``sqrt(1 - ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)``."""

    def __init__(self, prior: PixelGaussian, schedule: dk.NoiseSchedule):
        super().__init__()
        self.mean, self.var = prior.mean.double(), prior.std.double() ** 2
        self.ab = schedule.alphas_cumprod.double()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the samplers a device to read

    def forward(self, x, t):
        ab = self.ab[t.cpu()].reshape(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mean) / (ab * self.var + 1 - ab)
        return eps.to(x.dtype)


def test_t_start_T_minus_1_with_the_same_noise_is_the_full_chain(tiny_unet):
    sched = dk.NoiseSchedule.linear(40)
    x0, z = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    x_T, _ = dk.q_sample(x0, 39, z, schedule=sched)
    kw = dict(schedule=sched, device="cpu")
    full = samplers.ddpm_sample(tiny_unet, None, x_T=x_T, generator=torch.Generator().manual_seed(5), **kw)
    trunc = samplers.ddpm_sample(tiny_unet, None, x_start=x0, t_start=39, start_noise=z,
                                 generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(full, trunc)
    for eta in (0.0, 0.7):  # trailing spacing starts at T - 1
        full = samplers.ddim_sample(tiny_unet, None, n_steps=8, eta=eta, spacing="trailing", x_T=x_T,
                                    generator=torch.Generator().manual_seed(6), **kw)
        trunc = samplers.ddim_sample(tiny_unet, None, n_steps=8, eta=eta, spacing="trailing", x_start=x0,
                                     t_start=39, start_noise=z, generator=torch.Generator().manual_seed(6), **kw)
        assert torch.equal(full, trunc)
    other = samplers.ddpm_sample(tiny_unet, None, x_start=x0, t_start=38, start_noise=z,
                                 generator=torch.Generator().manual_seed(5), **kw)
    assert float((other - full).abs().max()) > 1e-3


def test_t_start_T_minus_1_is_close_to_the_chain_from_that_noise():
    """On the default 1000-step schedule ``sqrt(alphas_cumprod[999]) = 0.0064``: starting
    at T - 1 from any x_start is nearly the chain started from the noise itself."""
    sched = dk.NoiseSchedule.linear()
    images, _ = load_digits(8)
    model = GaussianEps(PixelGaussian.fit(images), sched)
    x0, z = images[:16], torch.randn(16, 1, 8, 8)
    full = samplers.ddim_sample(model, None, n_steps=20, spacing="trailing", x_T=z, device="cpu")
    trunc = samplers.ddim_sample(model, None, n_steps=20, spacing="trailing", x_start=x0, t_start=999,
                                 start_noise=z, device="cpu")
    diff = float((full - trunc).abs().max())
    assert 0 < diff < 0.02


def test_truncated_chain_visits_t_start_then_the_schedule_below_it(tiny_unet):
    sched = dk.NoiseSchedule.linear(40)
    x0, z = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    counting = CountingModel(tiny_unet)
    out = samplers.ddim_sample(counting, None, n_steps=10, eta=0.5, schedule=sched, x_start=x0, t_start=17,
                               start_noise=z, generator=torch.Generator().manual_seed(1), device="cpu")
    assert samplers.timesteps(10, 40) == [36, 32, 28, 24, 20, 16, 12, 8, 4, 0]
    assert counting.ts == [17, 16, 12, 8, 4, 0]
    # The same chain by hand with the ops.
    x, _ = dk.q_sample(x0, 17, z, schedule=sched)
    g = torch.Generator().manual_seed(1)
    ts = [17, 16, 12, 8, 4, 0, -1]
    with torch.no_grad():
        for t, t_prev in zip(ts[:-1], ts[1:], strict=True):
            tt = torch.full((2,), t, dtype=torch.int64)
            x = dk.ddim_step(x, tiny_unet(x, tt), tt, 0.5, t_prev=torch.full((2,), t_prev, dtype=torch.int64),
                             schedule=sched, generator=g)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    counting.ts.clear()
    samplers.ddpm_sample(counting, None, schedule=sched, x_start=x0, t_start=5,
                         generator=torch.Generator().manual_seed(2), device="cpu")
    assert counting.ts == [5, 4, 3, 2, 1, 0]


def test_truncation_from_real_digits_stays_close_and_drifts_with_t_start():
    """With the exact denoiser of the pixel-Gaussian fit of the digits, a chain started from
    real digits at a small t_start returns them almost unchanged; the distance to the
    input grows with t_start, towards that of an independent sample at T - 1."""
    sched = dk.NoiseSchedule.linear()
    images, _ = load_digits(16)
    model = GaussianEps(PixelGaussian.fit(images), sched)
    x0 = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:128]]
    # Typical distance between two different digits (RMS per pixel).
    independent = float((x0 - x0.roll(1, 0)).square().mean((1, 2, 3)).sqrt().mean())
    for name, run in [("ddpm", lambda t, g: samplers.ddpm_sample(model, None, x_start=x0, t_start=t, generator=g)),
                      ("ddim", lambda t, g: samplers.ddim_sample(model, None, n_steps=50, x_start=x0, t_start=t,
                                                                 generator=g))]:
        dist = []
        for t_start in (5, 50, 100, 250, 500, 999):
            out = run(t_start, torch.Generator().manual_seed(t_start))
            dist.append(float((out - x0).square().mean((1, 2, 3)).sqrt().mean()))
        print(f"\n{name}: RMS distance to the input by t_start {dist}; independent digits {independent:.3f}")
        # At t_start = 5 the added noise has std sqrt(1 - alphas_cumprod[5]) = 0.030.
        assert dist[0] < 2 * float((1 - sched.alphas_cumprod[5]).sqrt()) < 0.15 * independent, name
        assert all(a < b for a, b in zip(dist, dist[1:], strict=False)), name
        assert dist[-1] > 0.6 * independent, name


def test_truncation_bad_inputs(tiny_unet):
    sched = dk.NoiseSchedule.linear(40)
    x0 = torch.randn(2, 1, 8, 8)
    kw = dict(schedule=sched, device="cpu")
    with pytest.raises(ValueError, match="t_start"):
        samplers.ddpm_sample(tiny_unet, None, x_start=x0, **kw)
    with pytest.raises(ValueError, match="x_start"):
        samplers.ddim_sample(tiny_unet, (2, 1, 8, 8), n_steps=10, t_start=3, **kw)
    with pytest.raises(ValueError, match="x_T or x_start"):
        samplers.ddim_sample(tiny_unet, None, n_steps=10, x_T=x0, x_start=x0, t_start=3, **kw)
    with pytest.raises(ValueError, match="t_start must be in"):
        samplers.ddpm_sample(tiny_unet, None, x_start=x0, t_start=40, **kw)


# ---- the crude priors ------------------------------------------------------------------
def test_pixel_gaussian_fits_the_moments():
    images = torch.rand(5000, 1, 4, 4) * 0.5 + torch.linspace(-0.9, 0.4, 16).reshape(1, 1, 4, 4)
    prior = PixelGaussian.fit(images, low=-1.0, high=1.0)
    x = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 1, 4, 4) and float(x.min()) >= -1 and float(x.max()) <= 1
    torch.testing.assert_close(x.mean(0), images.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(x.std(0), images.std(0), atol=0.01, rtol=0)


def test_vae_trains_and_reloads(tmp_path):
    from diffkern.models import VAE
    from diffkern.training import load_model, train_vae

    images, _ = load_digits(16)
    torch.manual_seed(0)
    vae = VAE(1, 16, latent_dim=4, base_channels=8)
    x = images[:8]
    assert vae(x).shape == x.shape and vae.sample(3).shape == (3, 1, 16, 16)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (8, 4)
    tr = train_vae(vae, images, n_steps=40, batch_size=32, lr=3e-3, progress=False,
                   checkpoint_path=tmp_path / "vae.pt")
    h = torch.tensor(tr.loss_history)
    assert float(h[-10:].mean()) < float(h[:5].mean()) - 0.1  # nats per pixel
    rebuilt = load_model(tmp_path / "vae.pt")
    assert isinstance(rebuilt, VAE)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(rebuilt.sample(4, generator=g), tr.ema.model.sample(4, generator=torch.Generator()
                                                                                      .manual_seed(1)))
    with pytest.raises(ValueError, match="decoder_std"):
        VAE(decoder_std=0.0)
