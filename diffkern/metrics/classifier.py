"""A small CNN classifier whose penultimate features define the image Fréchet distance
(an FID for small data sets), trained once on the data set and cached to a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["FeatureClassifier", "train_classifier", "load_or_train_classifier", "default_cache_dir"]

_VERSION = 1  # bump when the architecture or training recipe changes: it is part of the cache key


class FeatureClassifier(nn.Module):
    """Three 3x3 convolutions (``width``, 2x, 4x channels) with 2x2 max pooling after the first
    two, adaptive average pooling to 2x2, a ``feature_dim`` ReLU layer (the features) and a
    linear classifier. Works for 8x8 .. 32x32 inputs; cheap enough to train on a CPU in seconds."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge padding with the background -1)."""
    B, _, H, W = x.shape
    p = max_shift
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=generator).tolist()
    dy = torch.randint(0, 2 * p + 1, (B,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None, epochs: int = 30,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0, device=None,
                     progress: bool = False) -> FeatureClassifier:
    """Train :class:`FeatureClassifier` with Adam and ±1-pixel shift augmentation."""
    from tqdm.auto import tqdm

    device = torch.device(device or "cpu")
    torch_gen = torch.Generator().manual_seed(seed)
    num_classes = num_classes or int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(images.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = images.shape[0]
    images, labels = images.cpu(), labels.cpu()
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress, leave=False):
        model.train()
        perm = torch.randperm(n, generator=torch_gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = _shift(images[idx], torch_gen).to(device)
            loss = nn.functional.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def default_cache_dir() -> Path:
    """``$DIFFKERN_CACHE`` if set, else ``~/.cache/diffkern``."""
    return Path(os.environ.get("DIFFKERN_CACHE", Path.home() / ".cache" / "diffkern"))


def _fingerprint(images: torch.Tensor, labels: torch.Tensor, **config) -> str:
    h = hashlib.sha256()
    h.update(images.detach().cpu().contiguous().to(torch.float32).numpy().tobytes())
    h.update(labels.detach().cpu().contiguous().to(torch.int64).numpy().tobytes())
    h.update(repr(sorted(config.items())).encode())
    h.update(f"v{_VERSION}".encode())
    return h.hexdigest()[:16]


def load_or_train_classifier(images: torch.Tensor, labels: torch.Tensor, *, path=None, cache_dir=None,
                             name: str = "classifier", epochs: int = 30, seed: int = 0, device=None,
                             progress: bool = False) -> FeatureClassifier:
    """The classifier for this exact data set: loaded from ``path`` (or from
    ``cache_dir/<name>-<fingerprint of data and recipe>.pt``) when present, else trained and
    written there. The file is read back with ``torch.load(weights_only=True)``."""
    from ..training.checkpoint import load_checkpoint, save_checkpoint

    if path is None:
        key = _fingerprint(images, labels, epochs=epochs, seed=seed)
        path = Path(cache_dir or default_cache_dir()) / f"{name}-{key}.pt"
    path = Path(path)
    device = torch.device(device or "cpu")
    if path.exists():
        state = load_checkpoint(path, map_location=device)
        model = FeatureClassifier(**state["config"]).to(device)
        model.load_state_dict(state["model"])
        return model.eval()
    model = train_classifier(images, labels, epochs=epochs, seed=seed, device=device, progress=progress)
    save_checkpoint(path, {"config": model.config, "model": model.state_dict()})
    return model
