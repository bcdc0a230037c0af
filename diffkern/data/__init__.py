"""Data sets with nothing to download: scikit-learn's 8x8 digits (as 16x16 in [-1, 1])
and Gaussian mixtures with exact density, sampling and score."""

from .digits import load_digits, train_test_split
from .mixtures import GaussianMixture, classic_mixture, uniform_box

__all__ = ["load_digits", "train_test_split", "GaussianMixture", "classic_mixture", "uniform_box"]
