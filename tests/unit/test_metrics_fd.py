"""Frechet distance (the metrics suite's one path, custom features) against closed forms."""

from __future__ import annotations

import math

import torch
from torch import nn

from cmexp.metrics import extract, frechet_distance


class Identity(nn.Module):
    """'Features' = the flattened image, so the Frechet distance is the one of the pixels."""

    num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_gaussians_is_the_closed_form() -> (
    None
):
    g = torch.Generator().manual_seed(0)
    n = 40000
    # extract() feeds the extractor [0, 1] images made from [-1, 1] ones: x01 = (x + 1) / 2
    real = extract(
        Identity(), (torch.randn(n, 1, 2, 2, generator=g) * 0.1 + 0.5) * 2 - 1, batch_size=10000
    )
    assert abs(frechet_distance(real, real)) < 1e-6
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: |m1-m2|^2 + d (s1 - s2)^2
    fake = extract(
        Identity(), (torch.randn(n, 1, 2, 2, generator=g) * 0.13 + 0.55) * 2 - 1, batch_size=10000
    )
    expected = (
        4 * 0.05**2 + 4 * (0.1 - 0.13) ** 2
    )  # both sets lie well inside [0, 1] (no clamping)
    assert math.isclose(frechet_distance(real, fake), expected, rel_tol=0.05)


def test_precision_recall_kid_and_is_behave_as_defined() -> None:
    from cmexp.metrics import score

    g = torch.Generator().manual_seed(0)
    real = {"features": torch.randn(600, 8, generator=g, dtype=torch.float64)}
    same = score(real, real, "t", kid_subset_size=200)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and abs(same["fd_t"]) < 1e-6
    assert abs(same["kid_t"]) < 3 * same["kid_t_std"] + 1e-3  # unbiased: ~0 up to subset noise
    # a collapsed generator: every sample near one real point -> precise but no recall
    collapsed = {
        "features": real["features"][:1]
        + 0.01 * torch.randn(600, 8, generator=g, dtype=torch.float64)
    }
    col = score(real, collapsed, "t", kid_subset_size=200)
    assert (
        col["precision"] > 0.9
        and col["recall"] < 0.05
        and col["fd_t"] > 5
        and col["kid_t"] > 10 * abs(same["kid_t"])
    )
    # IS from logits: confident and balanced over K classes -> K; constant -> 1
    k = 10
    logits = torch.full((1000, k), -50.0, dtype=torch.float64)
    logits[torch.arange(1000), torch.arange(1000) % k] = 50.0
    assert (
        abs(
            score(real, {"features": real["features"], "logits": logits}, "t", isc_splits=1)[
                "is_t"
            ]
            - k
        )
        < 1e-6
    )
    flat = torch.zeros(1000, k, dtype=torch.float64)
    assert abs(score(real, {"features": real["features"], "logits": flat}, "")["is"] - 1) < 1e-9


def test_precision_recall_in_row_blocks_equal_the_full_distance_matrix() -> None:
    """score() computes precision/recall in bounded row blocks (a 50k real set would need a
    10 GB distance matrix at once); any block size gives torch-fidelity's full-matrix numbers."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from cmexp.metrics import score

    g = torch.Generator().manual_seed(1)
    real = {"features": torch.randn(500, 6, generator=g, dtype=torch.float64)}
    fake = {"features": 0.7 * torch.randn(300, 6, generator=g, dtype=torch.float64) + 0.5}
    full = prc_features_to_metric(
        fake["features"].float(),
        real["features"].float(),
        prc_neighborhood=3,
        prc_batch_size=10_000,
        save_cpu_ram=False,
        verbose=False,
    )
    assert 0 < full["precision"] < 1 and 0 < full["recall"] < 1  # a case where blocks could differ
    for batch in (None, 7, 64, 1000):
        got = score(real, fake, "t", kid_subset_size=100, prc_batch_size=batch)
        assert (got["precision"], got["recall"]) == (full["precision"], full["recall"]), batch
