"""The FID protocol (issue 33): the Frechet distance against a direct numpy/scipy computation,
reference statistics files with a known answer through ``cmexp.eval reference=``, and the
SHA-256 pins of downloaded files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def _direct_fd(mu1, s1, mu2, s2) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_a_direct_scipy_computation() -> None:
    from cmexp.metrics.suite import frechet_distance, frechet_distance_stats

    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((300, 16)) * 1.5 + 0.3
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    want = _direct_fd(*stats[0], *stats[1])
    assert frechet_distance_stats(*stats[0], *stats[1]) == pytest.approx(want, rel=1e-6)
    got = frechet_distance({"features": torch.from_numpy(a)}, {"features": torch.from_numpy(b)})
    assert got == pytest.approx(want, rel=1e-6)
    # diagonal Gaussians in closed form: |m1 - m2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    closed = 3.0 + float((s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance_stats(np.ones(3), np.diag(s1), np.zeros(3), np.diag(s2)) == (
        pytest.approx(closed, rel=1e-9)
    )


def test_eval_against_a_reference_statistics_file_has_the_known_answer(tmp_path: Path) -> None:
    """Reference statistics = the samples' own (FD 0), then with mu shifted by v (FD |v|^2):
    ``cmexp.eval samples=... reference=stats.npz`` with the Fashion-MNIST classifier features."""
    from cmexp.eval import evaluate
    from cmexp.metrics import ClassifierFeatures
    from cmexp.metrics.suite import extract
    from tests.integration.conftest import compose_train

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    feats = extract(ClassifierFeatures("zoo:fmnist_classifier"), torch.from_numpy(images))
    f = feats["features"].numpy()
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    v = np.zeros_like(mu)
    v[:3] = (0.5, -1.0, 2.0)
    for name, m, want in (("same", mu, 0.0), ("shifted", mu + v, 5.25)):
        np.savez(tmp_path / f"{name}.npz", mu=m, sigma=sigma)
        out = evaluate(
            compose_train(
                [
                    f"samples={tmp_path / 'samples.npz'}",
                    f"reference={tmp_path / f'{name}.npz'}",
                    "features.ckpt=zoo:fmnist_classifier",
                    "batch_size=8",
                ],
                tmp_path / name,
                "eval",
            )
        )
        fd = out["metrics"]["samples"]["fd_fmnist"]
        assert fd == pytest.approx(want, abs=1e-3)
        assert "kid_fmnist" not in out["metrics"]["samples"]  # needs real features, not stats
        saved = json.loads((tmp_path / name / "metrics.json").read_text())
        ref = saved["protocol"]["fid_protocol"]["reference"]["statistics"]
        assert ref["pin"] == "none" and len(ref["sha256"]) == 64


def test_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmexp.metrics import pins

    assert pins.PINNED[pins.INCEPTION_FILE].sha256.startswith("6726825d")  # torch.hub prefix
    # a file under a pinned name whose hash differs: refused (strict) or flagged
    fake = tmp_path / pins.INCEPTION_FILE
    fake.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="differs from the pinned 6726825d0af5f729"):
        pins.check_file(fake, "features.weights_path")
    assert pins.check_file(fake, "k", strict=False)["pin"] == "mismatch"
    # no published checksum: the first download is pinned beside the file, then checked
    name = "cifar10-32x32.npz"
    monkeypatch.setattr("cmexp.utils.network.online", lambda *a, **k: True)

    def fetch(url: str, dest: Path) -> None:
        np.savez(open(dest, "wb"), mu=np.zeros(2), sigma=np.eye(2))

    monkeypatch.setattr("urllib.request.urlretrieve", fetch)
    got = pins.download(name, tmp_path / "cache", "reference")
    rec = pins.check_file(got, "reference")
    assert rec["pin"] == "first-download" and (tmp_path / "cache" / f"{name}.sha256").is_file()
    got.write_bytes(b"changed")
    with pytest.raises(ValueError, match="recorded at its first download"):
        pins.check_file(got, "reference")
    # a download of a pinned file with another hash: nothing kept
    with pytest.raises(ValueError, match="nothing was kept"):
        pins.download(pins.INCEPTION_FILE, tmp_path / "dl", "features.weights_path")
    assert not any((tmp_path / "dl").iterdir())
    monkeypatch.setenv("CMEXP_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot be reached here"):
        pins.download("cifar10_legacy_tensorflow_train_32.npz", tmp_path / "x", "reference")
