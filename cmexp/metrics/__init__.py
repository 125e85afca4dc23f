"""Sample-quality metrics: feature extractors and FD / KID / IS / precision-recall from features."""

from cmexp.metrics.features import ClassifierFeatures, InceptionFeatures
from cmexp.metrics.suite import (
    RealFeatureCache,
    extract,
    frechet_distance,
    reference_features,
    score,
)

__all__ = [
    "ClassifierFeatures",
    "InceptionFeatures",
    "RealFeatureCache",
    "extract",
    "frechet_distance",
    "reference_features",
    "score",
]
