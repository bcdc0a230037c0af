"""Models: a small time-conditioned :class:`UNet` for images, :class:`ScoreNet`, an MLP
score model for low-dimensional data conditioned on sigma, and crude image generators to
start truncated chains from (:class:`PixelGaussian`, a small :class:`VAE`)."""

from .embeddings import sinusoidal_embedding
from .score_net import ScoreNet
from .unet import ResidualBlock, UNet
from .vae import VAE, PixelGaussian

__all__ = ["UNet", "ResidualBlock", "ScoreNet", "VAE", "PixelGaussian", "sinusoidal_embedding", "build_model",
           "count_parameters"]

_REGISTRY = {"UNet": UNet, "ScoreNet": ScoreNet, "VAE": VAE, "PixelGaussian": PixelGaussian}


def build_model(name: str, config: dict):
    """Rebuild a model from the ``(name, config)`` a checkpoint stores."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name].from_config(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
