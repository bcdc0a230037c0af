"""Sample-quality metrics.

Images: Fréchet distance on the features of a small CNN classifier trained (and cached)
on the same data set, plus classifier-label entropies. Points: mode weights with standard
errors, sliced Wasserstein distance and RBF MMD, with thresholds calibrated on pairs of
independent true samples.
"""

from .classifier import FeatureClassifier, default_cache_dir, load_or_train_classifier, train_classifier
from .images import ImageQuality, digits_quality, frechet_distance, gaussian_statistics
from .points import Calibration, calibrate, mmd_rbf, mode_weights, sliced_wasserstein

__all__ = ["FeatureClassifier", "train_classifier", "load_or_train_classifier", "default_cache_dir", "ImageQuality",
           "digits_quality", "frechet_distance", "gaussian_statistics", "mode_weights", "sliced_wasserstein",
           "mmd_rbf", "Calibration", "calibrate"]
