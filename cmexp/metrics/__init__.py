"""Sample-quality metrics: feature extractors for torchmetrics' Frechet distance / KID."""

from cmexp.metrics.features import ClassifierFeatures, frechet_distance_metric

__all__ = ["ClassifierFeatures", "frechet_distance_metric"]
