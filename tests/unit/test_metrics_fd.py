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
