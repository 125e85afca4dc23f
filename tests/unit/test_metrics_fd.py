"""Frechet distance (torchmetrics, custom features) against closed forms."""

from __future__ import annotations

import math

import torch
from torch import nn

from cmexp.metrics import frechet_distance_metric


class Identity(nn.Module):
    """'Features' = the flattened image, so the Frechet distance is the one of the pixels."""

    num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_gaussians_is_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    n = 40000
    real = torch.randn(n, 1, 2, 2, generator=g) * 0.1 + 0.5
    fd = frechet_distance_metric(Identity())
    fd.update(real, real=True)
    fd.update(real, real=False)
    assert abs(float(fd.compute())) < 1e-6
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: |m1-m2|^2 + d (s1 - s2)^2
    fd.reset()  # keeps the real statistics
    fake = torch.randn(n, 1, 2, 2, generator=g) * 0.2 + 0.6
    fd.update(fake, real=False)
    expected = 4 * 0.1**2 + 4 * (0.1 - 0.2) ** 2
    assert math.isclose(float(fd.compute()), expected, rel_tol=0.05)


def test_precision_recall_kid_and_is_behave_as_defined() -> None:
    from cmexp.metrics import score

    g = torch.Generator().manual_seed(0)
    real = {"features": torch.randn(600, 8, generator=g, dtype=torch.float64)}
    same = score(real, real, "t", kid_subset_size=200)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and abs(same["fd_t"]) < 1e-6
    assert abs(same["kid_t"]) < 3 * same["kid_t_std"] + 1e-3  # unbiased: ~0 up to subset noise
    # a collapsed generator: every sample near one real point -> precise but no recall
    collapsed = {"features": real["features"][:1] + 0.01 * torch.randn(600, 8, generator=g, dtype=torch.float64)}
    col = score(real, collapsed, "t", kid_subset_size=200)
    assert col["precision"] > 0.9 and col["recall"] < 0.05 and col["fd_t"] > 5 and col["kid_t"] > 10 * abs(same["kid_t"])
    # IS from logits: confident and balanced over K classes -> K; constant -> 1
    k = 10
    logits = torch.full((1000, k), -50.0, dtype=torch.float64)
    logits[torch.arange(1000), torch.arange(1000) % k] = 50.0
    assert abs(score(real, {"features": real["features"], "logits": logits}, "t", isc_splits=1)["is_t"] - k) < 1e-6
    flat = torch.zeros(1000, k, dtype=torch.float64)
    assert abs(score(real, {"features": real["features"], "logits": flat}, "")["is"] - 1) < 1e-9
