"""The paper's sample-quality numbers from features: Frechet distance, KID, Inception-style
score and precision/recall (Kynkaanniemi et al. 2019, k = 3), computed by torch-fidelity's
feature-level functions so every metric shares one feature pass.

Feature extractors take images ``[B,C,H,W]`` as floats in [0, 1] and return ``[B,D]``
features; those with a ``logits`` method also give the class probabilities of IS.
Metric names carry the extractor's ``name`` (``fd_fmnist``, not ``fid``, for the
Fashion-MNIST classifier).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def extract(
    features: nn.Module,
    images: Tensor,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
) -> dict[str, Tensor]:
    """``{"features": [N,D], "logits": [N,K] (if the extractor has logits)}`` of images in
    [-1, 1] (``[N,C,H,W]`` float) or uint8 ``[N,H,W,C]`` (the npz convention)."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, total=math.ceil(len(images) / batch_size), desc=desc, unit="batch")
    feats, logits = [], []
    has_logits = hasattr(features, "logits")
    for i in starts:
        x = ((images[i : i + batch_size].to(device).float() + 1) / 2).clamp(0, 1)
        feats.append(features(x).double().cpu())
        if has_logits:
            logits.append(features.logits(x).double().cpu())
    out = {"features": torch.cat(feats)}
    if has_logits:
        out["logits"] = torch.cat(logits)
    return out


def frechet_distance(real: dict[str, Tensor], fake: dict[str, Tensor]) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (outputs of
    :func:`extract`), torch-fidelity's computation (FID's when the features are Inception's)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    fr, ff = real["features"], fake["features"]
    if len(ff) < 2 or len(fr) < 2:
        raise ValueError(
            f"need at least 2 real and 2 generated images, got {len(fr)} and {len(ff)}"
        )
    stats_r, stats_f = fid_features_to_statistics(fr), fid_features_to_statistics(ff)
    return float(
        fid_statistics_to_metric(stats_f, stats_r, verbose=False)["frechet_inception_distance"]
    )


def frechet_distance_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (torch-fidelity's
    computation, the one :func:`frechet_distance` uses on fitted statistics)."""
    import numpy as np
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    b = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)["frechet_inception_distance"])


def read_reference_stats(path: str | Path, key: str = "reference") -> dict[str, Any]:
    """``{"mu": [D], "sigma": [D, D]}`` (float64) of a reference statistics ``.npz`` (EDM's
    ``fid-refs/*.npz``, clean-fid's ``stats/*.npz``: arrays ``mu`` and ``sigma``); a missing,
    unreadable or ill-shaped file is a ValueError naming ``key``."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data]
            if missing:
                raise ValueError(
                    f"{key}={path} has no '{missing[0]}' array (found {sorted(data.keys())}); "
                    "expected reference statistics with 'mu' [D] and 'sigma' [D, D]"
                )
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(f"{key}="):
            raise
        raise ValueError(
            f"{key}={path} is not a readable .npz of reference statistics ({type(err).__name__}: "
            "truncated or not an npz?)"
        ) from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 2 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(
            f"{key}={path}: mu {mu.shape} and sigma {sigma.shape} are not the mean [D] and "
            "covariance [D, D] of one feature space (or hold NaN/inf)"
        )
    return {"mu": mu, "sigma": sigma}


def score(
    real: dict[str, Tensor],
    fake: dict[str, Tensor],
    name: str = "fmnist",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    seed: int = 2020,
    prc_batch_size: int | None = None,
) -> dict[str, float]:
    """Metrics of generated features ``fake`` against real features ``real``
    (outputs of :func:`extract`). Keys: ``fd_<name>``, ``kid_<name>`` (+``_std``),
    ``precision``, ``recall``, and ``is_<name>`` (+``_std``) when logits exist; with
    ``name=""`` (Inception) the usual ``fid``, ``kid``, ``is``.

    Precision/recall need every set's k-th neighbour distances: torch-fidelity's row-block
    computation (``save_cpu_ram``) with ``prc_batch_size`` rows per block (default: blocks of
    at most 2.5e8 distances, ~1 GB; the full 50k x 50k matrix of 50k real images needs 10 GB
    and, with kthvalue's copy, overflowed 24 GB). Same numbers as the full matrix (tested)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    fr, ff = real["features"], fake["features"]
    fd_key, sfx = (f"fd_{name}", f"_{name}") if name else ("fid", "")
    out = {fd_key: frechet_distance(real, fake)}
    size = min(kid_subset_size, len(fr), len(ff))
    kid = kid_features_to_metric(
        ff,
        fr,
        kid_subsets=kid_subsets,
        kid_subset_size=size,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        kid_kernel="poly",
        rng_seed=seed,
        verbose=False,
    )
    out[f"kid{sfx}"], out[f"kid{sfx}_std"] = (
        float(kid["kernel_inception_distance_mean"]),
        float(kid["kernel_inception_distance_std"]),
    )
    k = min(prc_neighborhood, len(fr) - 1, len(ff) - 1)
    if prc_batch_size is None:
        prc_batch_size = max(1, min(10_000, 250_000_000 // max(len(fr), len(ff))))
    prc = prc_features_to_metric(
        ff.float(),
        fr.float(),
        prc_neighborhood=k,
        prc_batch_size=int(prc_batch_size),
        save_cpu_ram=True,
        verbose=False,
    )
    out["precision"], out["recall"] = float(prc["precision"]), float(prc["recall"])
    if "logits" in fake:
        isc = isc_features_to_metric(
            fake["logits"], splits=min(isc_splits, len(ff)), shuffle=True, rng_seed=seed
        )
        out[f"is{sfx}"], out[f"is{sfx}_std"] = (
            float(isc["inception_score_mean"]),
            float(isc["inception_score_std"]),
        )
    return out


def score_against_stats(
    stats: dict[str, Any],
    fake: dict[str, Tensor],
    name: str = "",
    isc_splits: int = 10,
    seed: int = 2020,
) -> dict[str, float]:
    """The metrics that reference statistics allow (:func:`read_reference_stats`): the Frechet
    distance (``fid`` / ``fd_<name>``) and, with logits, IS. KID and precision/recall need the
    real features themselves and are left out."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.metric_isc import isc_features_to_metric

    ff = fake["features"]
    if len(ff) < 2:
        raise ValueError(f"need at least 2 generated images, got {len(ff)}")
    f = fid_features_to_statistics(ff)
    fd_key, sfx = (f"fd_{name}", f"_{name}") if name else ("fid", "")
    out = {fd_key: frechet_distance_stats(f["mu"], f["sigma"], stats["mu"], stats["sigma"])}
    if "logits" in fake:
        isc = isc_features_to_metric(
            fake["logits"], splits=min(isc_splits, len(ff)), shuffle=True, rng_seed=seed
        )
        out[f"is{sfx}"], out[f"is{sfx}_std"] = (
            float(isc["inception_score_mean"]),
            float(isc["inception_score_std"]),
        )
    return out


def weights_hash(path: str | Path, length: int = 12) -> str:
    """First ``length`` hex digits of the file's SHA-256 (recorded in eval protocols)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class RealFeatureCache:
    """Real-data features computed once and stored as ``<dir>/<key>.pt`` under a key of
    (dataset, split, resolution, channels, extractor and its weights hash, count)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dir = Path(dirpath)

    @staticmethod
    def key(
        dataset: str,
        split: str,
        resolution: int,
        channels: int,
        extractor: str,
        weights: str,
        count: int,
    ) -> str:
        raw = f"{dataset}|{split}|{resolution}|{channels}|{extractor}|{weights}|{count}"
        return f"{dataset}-{split}-{resolution}px-{extractor}-{count}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"

    def get(self, key: str, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        file = self.dir / f"{key}.pt"
        if file.is_file():
            return torch.load(file, map_location="cpu", weights_only=True)
        value = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")  # one temp name per process
        torch.save(value, tmp)
        tmp.replace(file)  # atomic: parallel runs never read half a file
        return value


def reference_features(
    cache: RealFeatureCache,
    features: nn.Module,
    datamodule: Any,
    split: str,
    count: int,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Tensor]:
    """Features of ``count`` real images of ``split`` (the reference of every sample-quality
    number), computed once per (dataset, split, resolution, channels, extractor and weights
    hash, count) and then read from ``cache``."""
    proto = describe(features)
    name = str(getattr(features, "name", "")) or type(features).__name__
    data_name = (
        getattr(datamodule, "reference_name", None) or type(datamodule).__name__
    )  # latent runs: the images'
    key = cache.key(
        data_name,
        split,
        int(datamodule.resolution),
        int(datamodule.channels),
        name,
        proto["weights_sha256"] or proto["extractor"],
        int(count),
    )
    return cache.get(
        key,
        lambda: extract(
            features,
            datamodule.real_images(int(count), split),
            batch_size,
            device,
            progress,
            "real features",
        ),
    )


def describe(features: Any) -> dict[str, str]:
    """Protocol entries of an extractor: its name, class and weights file + hash."""
    src = str(getattr(features, "source", ""))
    return {
        "extractor": f"{type(features).__module__}.{type(features).__name__}",
        "extractor_name": str(getattr(features, "name", "")),
        "weights": src,
        "weights_sha256": weights_hash(src) if src and Path(src).is_file() else "",
    }
