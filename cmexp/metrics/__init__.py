"""Sample-quality metrics: feature extractors for torchmetrics' Frechet distance / KID."""

from cmexp.metrics.features import ClassifierFeatures, InceptionFeatures, frechet_distance_metric
from cmexp.metrics.suite import RealFeatureCache, extract, score

__all__ = ["ClassifierFeatures", "InceptionFeatures", "RealFeatureCache", "extract", "frechet_distance_metric", "score"]
