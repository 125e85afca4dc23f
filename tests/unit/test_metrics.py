"""Distance metrics: closed-form values, LPIPS loading from fake backbone files, offline error."""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from cmexp.losses import distances
from cmexp.losses.distances import LPIPSDistance, PseudoHuberDistance, l1, l2, pseudo_huber
from tests.fakes import fake_vgg16_state, write_fake_vgg16

CONF = Path(__file__).resolve().parents[2] / "conf" / "metric"


def test_l2_l1_by_hand() -> None:
    x = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2).expand(2, -1, -1, -1)
    torch.testing.assert_close(l2(x, y), torch.full((2,), 6.0 / 4))
    torch.testing.assert_close(l1(x, y), torch.full((2,), 4.0 / 4))
    assert torch.equal(l2(y, y), torch.zeros(2))


def test_pseudo_huber_default_c_and_limits() -> None:
    x = torch.zeros(3, 3, 32, 32, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3072)
    assert c == pytest.approx(0.0299, abs=1e-4)
    small = x.clone()
    small[:, 0, 0, 0] = 1e-3
    # ~ ||d||^2 / (2c) for small differences
    assert pseudo_huber(small, x)[0].item() == pytest.approx(1e-6 / (2 * c), rel=1e-3)
    big = x.clone()
    big[:, 0, 0, 0] = 10.0
    assert pseudo_huber(big, x)[0].item() == pytest.approx(10.0 - c, rel=1e-4)
    assert PseudoHuberDistance(c=1.0)(big, x)[0].item() == pytest.approx(math.sqrt(101) - 1)
    with pytest.raises(ValueError, match="metric.c"):
        PseudoHuberDistance(c=-1.0)


@pytest.mark.parametrize("name", ["l2", "l1", "pseudo_huber"])
def test_metric_configs_instantiate(name: str) -> None:
    metric = hydra.utils.instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    x = torch.randn(4, 1, 8, 8)
    assert metric(x, x + 0.1).shape == (4,)


@pytest.fixture(scope="module")
def fake_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("torch_home")
    write_fake_vgg16(home / "hub" / "checkpoints")
    return home


def test_lpips_loads_backbone_from_hub_cache(
    fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(fake_home))
    d = LPIPSDistance(resize=64)
    saved = fake_vgg16_state()
    own = d.model.net.state_dict()
    assert torch.equal(own["slice1.0.weight"], saved["features.0.weight"])
    assert torch.equal(own["slice5.28.bias"], saved["features.28.bias"])
    assert all(not p.requires_grad for p in d.model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(d(x, x), torch.zeros(2), atol=1e-6)
    x.requires_grad_(True)
    out = d(x, y)
    assert out.shape == (2,) and (out > 0).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # grey images are repeated to RGB
    g = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(
        d(g, g.flip(-1)), d(g.expand(-1, 3, -1, -1), g.flip(-1).expand(-1, 3, -1, -1))
    )


def test_lpips_upsamples_before_the_backbone(
    fake_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(fake_home))
    seen = []
    d = LPIPSDistance(resize=48)
    d.model.net.slice1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    d(torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16) * 0.5)
    assert seen[0] == (1, 3, 48, 48)
    assert LPIPSDistance().resize == 224


def test_lpips_weights_path_file_or_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    path = write_fake_vgg16(tmp_path / "w", seed=3)
    for given in (path, path.parent):
        d = LPIPSDistance(weights_path=str(given), resize=None)
        assert torch.equal(
            d.model.net.state_dict()["slice2.5.weight"], fake_vgg16_state(3)["features.5.weight"]
        )
    with pytest.raises(FileNotFoundError, match="metric.weights_path"):
        LPIPSDistance(weights_path=str(tmp_path / "missing.pth"))


def test_lpips_offline_error_is_fast_and_names_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(distances, "online", lambda url, timeout=2.0: False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        LPIPSDistance()
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg
    assert "metric.weights_path" in msg


def test_lpips_offline_check_really_is_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without patching: on a machine without network the real check also fails in < 5 s."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("CMEXP_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError):
        LPIPSDistance()
    assert time.perf_counter() - start < 5
