"""Crude image generators to start truncated diffusion chains from (ES-DDPM, SDEdit):
a per-pixel Gaussian fitted to the data, and a small convolutional VAE."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PixelGaussian", "VAE"]


class PixelGaussian(nn.Module):
    """Independent N(mean_i, std_i^2) per pixel, fitted to a data set by moments.

    The crudest prior with the data's first two moments per pixel: its samples are
    speckled, average-looking digits. ``sample`` clamps to ``[low, high]`` (the data range)."""

    def __init__(self, shape: tuple[int, ...] = (1, 16, 16), *, low: float = -1.0, high: float = 1.0):
        super().__init__()
        self.config = dict(shape=tuple(shape), low=low, high=high)
        self.low, self.high = float(low), float(high)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @classmethod
    def from_config(cls, config: dict) -> PixelGaussian:
        return cls(**config)

    @classmethod
    def fit(cls, images: torch.Tensor, **kwargs) -> PixelGaussian:
        """Per-pixel mean and standard deviation of ``images`` (N, *shape)."""
        prior = cls(tuple(images.shape[1:]), **kwargs)
        prior.mean.copy_(images.mean(0))
        prior.std.copy_(images.std(0))
        return prior

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        gd = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn((n,) + tuple(self.mean.shape), generator=generator, device=gd).to(self.mean.device)
        x = (self.mean + self.std * z).clamp(self.low, self.high)
        return x.to(device) if device is not None else x


class VAE(nn.Module):
    """A small convolutional VAE (Kingma & Welling 2014) for (B, C, H, W) images in [-1, 1].

    Encoder: 3x3 conv, two stride-2 convs (H/4 x W/4), a linear map to the mean and
    log-variance of a ``latent_dim`` Gaussian. Decoder: the mirror image, nearest
    upsampling + conv, and ``tanh`` onto [-1, 1]. Likelihood: N(decoder(z), decoder_std^2)
    per pixel with a fixed ``decoder_std`` (which sets the balance of reconstruction and
    KL: smaller is sharper but farther from the prior). Defaults: about 0.1M parameters.

    ``loss(x, generator)`` is the negative ELBO in nats per pixel (``beta`` scales the KL);
    ``sample(n)`` decodes z ~ N(0, I) and returns the decoder means.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, *, latent_dim: int = 16, base_channels: int = 32,
                 decoder_std: float = 0.2):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        if not decoder_std > 0:
            raise ValueError(f"decoder_std must be positive, got {decoder_std}")
        self.config = dict(in_channels=in_channels, image_size=image_size, latent_dim=latent_dim,
                           base_channels=base_channels, decoder_std=decoder_std)
        c, self.latent_dim, self.decoder_std = base_channels, latent_dim, float(decoder_std)
        self.inner = (2 * c, image_size // 4, image_size // 4)
        n_inner = 2 * c * (image_size // 4) ** 2
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), act(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), act(),
            nn.Conv2d(2 * c, 2 * c, 4, stride=2, padding=1), act(), nn.Flatten())
        self.to_latent = nn.Linear(n_inner, 2 * latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, n_inner), act())
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * c, c, 3, padding=1), act(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1), act(),
            nn.Conv2d(c, in_channels, 3, padding=1))

    @classmethod
    def from_config(cls, config: dict) -> VAE:
        return cls(**config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of q(z | x), each (B, latent_dim)."""
        h = self.to_latent(self.encoder(x))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(self.from_latent(z).reshape((-1,) + self.inner)))

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO per pixel: ``(E_q[-log N(x; dec(z), decoder_std^2)] + beta KL(q || N(0, I))) / pixels``,
        one reparameterised draw of z per image (from ``generator``)."""
        B = x.shape[0]
        mean, logvar = self.encode(x)
        gd = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(mean.shape, generator=generator, device=gd, dtype=mean.dtype).to(mean.device)
        z = mean + (0.5 * logvar).exp() * eps
        recon = self.decode(z)
        var = self.decoder_std**2
        nll = (0.5 * (x - recon) ** 2 / var).reshape(B, -1).sum(1) + 0.5 * x[0].numel() * math.log(2 * math.pi * var)
        kl = 0.5 * (mean * mean + logvar.exp() - 1.0 - logvar).sum(1)
        return (nll + beta * kl).mean() / x[0].numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` through the posterior mean."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        p = next(self.parameters())
        gd = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.latent_dim, generator=generator, device=gd).to(p.device, p.dtype)
        x = self.decode(z)
        return x.to(device) if device is not None else x
