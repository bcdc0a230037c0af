"""Image sample quality: Fréchet distance on a data-set-specific classifier's features
and classifier-label entropies."""

from __future__ import annotations

import math

import torch

from .classifier import FeatureClassifier, load_or_train_classifier

__all__ = ["gaussian_statistics", "frechet_distance", "ImageQuality", "digits_quality"]


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    f = features.detach().to(torch.float64)
    if f.shape[0] < 2:
        raise ValueError("need at least two feature vectors")
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))``, the squared 2-Wasserstein distance
    between two Gaussians. ``tr (C1 C2)^(1/2)`` is computed as the sum of square roots of
    the eigenvalues of the symmetric ``C1^(1/2) C2 C1^(1/2)`` (same spectrum), which stays
    real and stable where scipy's ``sqrtm`` of the non-symmetric product can go complex."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    e, v = torch.linalg.eigh(cov1)
    s1 = (v * e.clamp_min(0).sqrt()) @ v.T
    m = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


class ImageQuality:
    """Scores generated images against reference images with a :class:`FeatureClassifier`.

    - ``frechet_distance(images)``: FD between the features of ``images`` and of the reference;
    - ``label_entropy(images)``: ``conditional`` = mean entropy of p(y|x) (low: each sample
      looks like one definite class) and ``marginal`` = entropy of the mean p(y) (high, up
      to log(num_classes): all classes are produced), in nats.
    """

    def __init__(self, classifier: FeatureClassifier, reference_images: torch.Tensor, *, batch_size: int = 512):
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.device = next(classifier.parameters()).device
        self.reference_stats = gaussian_statistics(self.features(reference_images))

    @torch.no_grad()
    def _apply(self, fn, images: torch.Tensor) -> torch.Tensor:
        out = [fn(images[i:i + self.batch_size].to(self.device, torch.float32)).cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._apply(self.classifier.features, images)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self._apply(lambda x: torch.softmax(self.classifier(x).double(), dim=-1), images)

    def frechet_distance(self, images: torch.Tensor) -> float:
        if not bool(torch.isfinite(images).all()):
            return math.inf
        return frechet_distance(*gaussian_statistics(self.features(images)), *self.reference_stats)

    def label_entropy(self, images: torch.Tensor) -> dict:
        p = self.probabilities(images.clamp(-1e4, 1e4).nan_to_num(0.0)).clamp_min(1e-12)
        conditional = float(-(p * p.log()).sum(1).mean())
        pm = p.mean(0)
        marginal = float(-(pm * pm.log()).sum())
        return {"conditional": conditional, "marginal": marginal}

    def evaluate(self, images: torch.Tensor) -> dict:
        """``{"fd", "label_entropy", "class_entropy"}`` (conditional and marginal entropies)."""
        ent = self.label_entropy(images)
        return {"fd": self.frechet_distance(images), "label_entropy": ent["conditional"],
                "class_entropy": ent["marginal"]}


def digits_quality(*, size: int = 16, cache_dir=None, path=None, device=None, progress: bool = False,
                   epochs: int = 30) -> ImageQuality:
    """:class:`ImageQuality` for :func:`diffkern.data.load_digits`: the classifier is trained on
    the training split (cached, see :func:`load_or_train_classifier`) and the reference
    statistics are those of all 1797 digits."""
    from ..data.digits import load_digits

    train_x, train_y = load_digits(size, split="train")
    clf = load_or_train_classifier(train_x, train_y, path=path, cache_dir=cache_dir, name=f"digits{size}-classifier",
                                   epochs=epochs, device=device, progress=progress)
    all_x, _ = load_digits(size)
    return ImageQuality(clf, all_x)
