"""The model zoo: ``zoo:NAME`` resolves to a shipped, hash-checked file; paths pass through;
unknown names, missing and corrupt files fail on one line that says how to restore them; the
shipped Fashion-MNIST classifier loads as the fd_fmnist feature extractor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cmexp import zoo

CLASSIFIER = "fmnist_classifier"
ROOT = Path(__file__).resolve().parents[2]


def _registry() -> dict:
    return json.loads((zoo.ZOO_DIR / zoo.REGISTRY).read_text())["models"]


@pytest.fixture
def zoo_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the zoo folder that the module reads instead of the package's."""
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    return copy


def test_resolve_by_name_returns_the_shipped_file_with_the_registered_hash() -> None:
    path = zoo.resolve(f"zoo:{CLASSIFIER}", key="features.ckpt")
    assert path == zoo.ZOO_DIR / "fmnist_classifier.pt" and path.is_file()
    entry = _registry()[CLASSIFIER]
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["kind"] == "classifier" and entry["description"]
    assert path.stat().st_size < 3_000_000


def test_every_registered_model_has_its_file_and_a_provenance_record_with_the_same_hash() -> None:
    assert CLASSIFIER in zoo.names() and zoo.names() == sorted(_registry())
    for name in zoo.names():
        meta = zoo.info(name)
        assert Path(meta["path"]) == zoo.resolve(f"zoo:{name}")
        prov = meta["provenance"]
        assert prov["sha256"] == meta["sha256"] and prov["file"] == meta["file"]
        assert prov["command"] and prov["git_commit"] and prov["seed"] is not None


def test_classifier_provenance_records_the_command_and_the_accuracy() -> None:
    prov = zoo.info(f"zoo:{CLASSIFIER}")["provenance"]
    assert "python -m cmexp.train +experiment=fmnist_classifier" in prov["command"]
    assert prov["seed"] == 42 and prov["test_acc"] >= 0.92 and prov["test_images"] == 10_000
    assert prov["steps"] * prov["batch_size"] == prov["images_seen"]
    assert prov["parameters"] == 295_818 and prov["feature_dim"] == 128
    assert prov["machine"]["torch"] and prov["machine"]["cpu"]


def test_a_path_passes_through_expanded(tmp_path: Path) -> None:
    assert zoo.resolve(str(tmp_path / "a.ckpt")) == tmp_path / "a.ckpt"
    assert zoo.resolve("~/x/last.ckpt") == Path.home() / "x" / "last.ckpt"
    assert (
        zoo.resolve(tmp_path / "missing.ckpt") == tmp_path / "missing.ckpt"
    )  # existence: the caller's check
    assert not zoo.is_zoo("checkpoints/zoo:odd.ckpt") and zoo.is_zoo("zoo:x")


def test_an_unknown_name_lists_the_names_and_the_config_key() -> None:
    with pytest.raises(
        ValueError, match="features.ckpt=zoo:nope: unknown zoo model 'nope'"
    ) as err:
        zoo.resolve("zoo:nope", key="features.ckpt")
    assert f"zoo:{CLASSIFIER}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown zoo model ''"):
        zoo.resolve("zoo:")
    with pytest.raises(ValueError, match="the zoo has"):
        zoo.info("nope")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_file_fails_with_the_restore_hint(
    zoo_copy: Path, damage: str
) -> None:
    file = zoo_copy / "fmnist_classifier.pt"
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    file.write_bytes(bytes(data))
    expected = _registry()[CLASSIFIER]["sha256"]
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        zoo.resolve(f"zoo:{CLASSIFIER}", key="features.ckpt")
    msg = str(err.value)
    assert msg.startswith(f"features.ckpt=zoo:{CLASSIFIER}: {file}") and "\n" not in msg
    assert f"expected {expected[:12]}" in msg
    assert "git checkout -- cmexp/zoo/fmnist_classifier.pt" in msg


def test_a_missing_file_fails_with_the_restore_hint(zoo_copy: Path) -> None:
    (zoo_copy / "fmnist_classifier.pt").unlink()
    with pytest.raises(
        FileNotFoundError, match="git checkout -- cmexp/zoo/fmnist_classifier.pt"
    ) as err:
        zoo.resolve(f"zoo:{CLASSIFIER}", key="quality.ckpt")
    assert str(err.value).startswith(f"quality.ckpt=zoo:{CLASSIFIER}: the shipped file")


def test_the_hash_is_computed_once_per_process(
    zoo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    calls: list[int] = []

    def counting() -> object:
        calls.append(1)
        return hashlib.sha256()

    monkeypatch.setattr(zoo, "hashlib", types.SimpleNamespace(sha256=counting))
    monkeypatch.setattr(zoo, "_hashes", {})
    first = zoo.resolve(f"zoo:{CLASSIFIER}")
    assert zoo.resolve(f"zoo:{CLASSIFIER}") == first and len(calls) == 1


def test_the_zoo_imports_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import cmexp.zoo as z; print(z.names())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert CLASSIFIER in out.stdout


def test_the_shipped_classifier_is_the_fd_fmnist_feature_extractor() -> None:
    from cmexp.metrics import ClassifierFeatures

    feats = ClassifierFeatures(ckpt=str(zoo.resolve(f"zoo:{CLASSIFIER}", key="features.ckpt")))
    assert sum(p.numel() for p in feats.net.parameters()) == 295_818
    assert feats.num_features == 128 and (feats.img_channels, feats.img_resolution) == (1, 32)
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    f = feats(x)
    assert f.shape == (3, 128) and f.dtype == torch.float32 and bool(torch.isfinite(f).all())
    assert torch.allclose(feats(x.float() / 255), f, atol=1e-5)  # uint8 and [0, 1] floats agree
    assert feats.logits(x).shape == (3, 10)


def test_the_shipped_classifier_classifies_real_test_images() -> None:
    from cmexp.data import FashionMNISTDataModule
    from cmexp.metrics import ClassifierFeatures

    try:
        test = FashionMNISTDataModule(data_dir=str(ROOT / "data")).dataset("test")
    except FileNotFoundError as err:  # only absent files skip; any other error fails the test
        if "not found" not in str(err):
            raise
        pytest.skip(f"Fashion-MNIST not available: {err}")
    feats = ClassifierFeatures(ckpt=str(zoo.resolve(f"zoo:{CLASSIFIER}")))
    n = 500
    acc = (feats.logits(test.images[:n]).argmax(1) == test.labels[:n]).float().mean().item()
    assert acc >= 0.9  # the full 10k test set: docs/zoo.md


def test_the_classifier_experiment_exports_outside_the_package(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "train", overrides=["+experiment=fmnist_classifier", f"paths.root_dir={tmp_path}"]
            )
    finally:
        GlobalHydra.instance().clear()
    raw = OmegaConf.to_container(cfg.model, resolve=False)["export_path"]
    assert raw == "${paths.root_dir}/checkpoints/fmnist_classifier.ckpt"
    export = Path(cfg.model.export_path)
    assert export == tmp_path / "checkpoints" / "fmnist_classifier.ckpt"
    assert zoo.ZOO_DIR not in export.parents
    assert (
        cfg.seed == 42 and cfg.net.feature_dim == 128 and cfg.net._target_ == "cmexp.nets.SmallCNN"
    )


def test_the_classifier_net_options_keep_the_original_layout_and_nhwc_changes_no_numbers() -> None:
    from cmexp.nets import SmallCNN

    torch.manual_seed(0)
    plain = SmallCNN(width=16)  # the original three double-conv blocks: keys and count unchanged
    assert (
        sum(p.numel() for p in plain.parameters()) == 81_850
        and "body.0.3.weight" in plain.state_dict()
    )
    a = SmallCNN(width=8, convs=[1, 2, 2]).eval()
    b = SmallCNN(width=8, convs=[1, 2, 2], channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(a.features(x), b.features(x), atol=1e-5)
    with pytest.raises(ValueError, match="net.convs"):
        SmallCNN(convs=[])


def test_random_translate_shifts_each_image_with_background_fill() -> None:
    from cmexp.methods.classifier.module import random_translate

    x = torch.rand(6, 1, 12, 12) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    y = random_translate(x, 2, gen)
    dy, dx = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(0)) - 2
    for i in range(6):
        sy, sx = -int(dy[i]), -int(dx[i])  # content moves by (-dy, -dx); uncovered pixels are -1
        ref = torch.full_like(x[i], -1.0)
        ys, yd = (
            (slice(0, 12 - sy), slice(sy, 12)) if sy >= 0 else (slice(-sy, 12), slice(0, 12 + sy))
        )
        xs, xd = (
            (slice(0, 12 - sx), slice(sx, 12)) if sx >= 0 else (slice(-sx, 12), slice(0, 12 + sx))
        )
        ref[:, yd, xd] = x[i][:, ys, xs]
        assert torch.equal(y[i], ref)


def test_the_shipped_edm_teacher_loads_by_name_and_denoises_real_images() -> None:
    """zoo:fmnist_edm: an EDM model every ckpt=/model.teacher_path= takes by name, with a
    provenance record, that removes noise from real test images (a trained denoiser)."""
    from cmexp.data import FashionMNISTDataModule
    from cmexp.inference.loader import load_model

    prov = zoo.info("zoo:fmnist_edm")["provenance"]
    assert prov["kind"] == "edm" and prov["steps"] * prov["batch_size"] == prov["images_seen"]
    assert "+experiment=fmnist_edm" in prov["command"] and prov["scores"]
    model = load_model("zoo:fmnist_edm")
    assert model.kind == "edm" and (model.img_channels, model.img_resolution) == (1, 32)
    assert model.label_dim == 0 and model.sigma_data == 0.5
    try:
        test = FashionMNISTDataModule(data_dir=str(ROOT / "data")).dataset("test")
    except FileNotFoundError as err:  # only absent files skip; any other error fails the test
        if "not found" not in str(err):
            raise
        pytest.skip(f"Fashion-MNIST not available: {err}")
    x = test.images[:16].float() / 127.5 - 1  # uint8 -> [-1, 1], the training range
    gen = torch.Generator().manual_seed(0)
    for sigma in (0.2, 1.0):
        noisy = x + sigma * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            d = model.model(noisy, torch.full((16,), sigma))
        mse_noisy, mse_d = (noisy - x).pow(2).mean().item(), (d - x).pow(2).mean().item()
        assert mse_d < 0.5 * mse_noisy, (sigma, mse_d, mse_noisy)


def test_the_shipped_cd_student_loads_by_name_and_samples_in_one_step() -> None:
    """zoo:fmnist_cd: the CD student of zoo:fmnist_edm (docs/zoo.md), a consistency model with
    the paper's 2-step tau; one step maps noise to images in [-1, 1] that are not noise."""
    from cmexp.inference import generate, load_model, sigma_plan

    prov = zoo.info("zoo:fmnist_cd")["provenance"]
    assert (
        prov["kind"] == "cd"
        and prov["steps"] == 1200
        and prov["teacher"].startswith("zoo:fmnist_edm")
    )
    model = load_model("zoo:fmnist_cd")
    assert model.family == "consistency" and list(model.spec.taus) == [0.585]
    x = generate(model, 4, sigma_plan(model.spec, 1), seed=0)
    assert x.shape == (4, 1, 32, 32) and bool(torch.isfinite(x).all()) and x.abs().max() <= 1
    # a garment on a dark background: the border is darker than the centre
    assert x[..., :3, :].mean() < x[..., 10:22, 10:22].mean()


def test_the_shipped_ct_model_loads_by_name_and_samples_in_one_step() -> None:
    """zoo:fmnist_ct: CT from random weights (no teacher; docs/zoo.md), a consistency model
    whose one step maps noise to images in [-1, 1] that are garments, not noise."""
    from cmexp.inference import generate, load_model, sigma_plan

    prov = zoo.info("zoo:fmnist_ct")["provenance"]
    assert prov["kind"] == "ct" and "+experiment=fmnist_ct_pseudo_huber" in prov["command"]
    assert prov["steps"] * prov["batch_size"] == prov["images_seen"] and prov["scores"]
    model = load_model("zoo:fmnist_ct")
    assert (
        model.family == "consistency"
        and model.kind == "ct"
        and (model.img_channels, model.img_resolution) == (1, 32)
    )
    x = generate(model, 4, sigma_plan(model.spec, 1), seed=0)
    assert x.shape == (4, 1, 32, 32) and bool(torch.isfinite(x).all()) and x.abs().max() <= 1
    # a garment on a dark background: the border is darker than the centre
    assert x[..., :3, :].mean() < x[..., 10:22, 10:22].mean()
