"""Per-class sample quality of a class-conditional model: the Frechet distance of each class's
samples to the real images of that class, and the class accuracy of the samples (the feature
classifier's argmax against the label each image was sampled with)."""

from __future__ import annotations

from torch import Tensor

from cmexp.metrics.suite import frechet_distance


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose classifier argmax is their label. ``logits``: ``[N, K]``;
    ``labels``: int ``[N]``."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits but {labels.shape[0]} labels")
    return float((logits.argmax(1).cpu() == labels.cpu()).double().mean())


def per_class_scores(
    real: dict[str, Tensor],
    real_labels: Tensor,
    fake: dict[str, Tensor],
    fake_labels: Tensor,
    name: str = "fmnist",
) -> dict[str, float]:
    """``{"fd_<name>_class<k>": FD of class k's samples vs class k's real images}`` for every
    class with at least 2 images on both sides, plus ``class_accuracy`` when the extractor has
    logits (its classes must be the dataset's: the Fashion-MNIST classifier on Fashion-MNIST).

    Shapes: features ``[N, D]`` (outputs of :func:`cmexp.metrics.suite.extract`); labels ``[N]``.
    """
    out: dict[str, float] = {}
    if "logits" in fake:
        out["class_accuracy"] = class_accuracy(fake["logits"], fake_labels)
    prefix = f"fd_{name}" if name else "fid"
    for k in sorted(set(fake_labels.tolist())):
        r, f = real_labels == k, fake_labels == k
        if int(r.sum()) >= 2 and int(f.sum()) >= 2:
            out[f"{prefix}_class{k}"] = frechet_distance(
                {"features": real["features"][r]}, {"features": fake["features"][f]}
            )
    return out


__all__ = ["class_accuracy", "per_class_scores"]
