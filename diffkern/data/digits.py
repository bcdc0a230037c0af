"""The 8x8 handwritten digits that scikit-learn ships (1797 images, no download), as
16x16 images in [-1, 1]."""

from __future__ import annotations

import torch

__all__ = ["load_digits", "train_test_split"]


def load_digits(size: int = 16, *, split: str = "all", test_fraction: float = 0.2, seed: int = 0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(images, labels)``: images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64.

    The 0..16 pixel values are mapped linearly to [-1, 1], then upsampled bilinearly
    (``align_corners=False``) from 8x8 to ``size`` x ``size`` and clamped back into
    [-1, 1]. ``split`` is ``"all"``, ``"train"`` or ``"test"``: a fixed random split
    (``test_fraction``, ``seed``) by a seeded permutation, not stratified by label.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: sklearn is heavy to import

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    d = _sk_load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(-1.0, 1.0)
    if split != "all":
        train, test = train_test_split(images, labels, test_fraction=test_fraction, seed=seed)
        images, labels = train if split == "train" else test
    if device is not None:
        images, labels = images.to(device), labels.to(device)
    return images.contiguous(), labels


def train_test_split(images: torch.Tensor, labels: torch.Tensor, *, test_fraction: float = 0.2, seed: int = 0):
    """``((train_images, train_labels), (test_images, test_labels))`` by a seeded permutation."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])
