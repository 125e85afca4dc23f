"""Datamodules: real Fashion-MNIST, fake CIFAR-10 / image folders, the synthetic mixture, and
the resumable step-indexed loader."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from cmexp.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    GaussianMixtureDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    StepLoader,
    TensorImageDataset,
    datamodules,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
HAS_FMNIST = (datamodules.SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datamodules, "online", lambda *a, **k: False)


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_files_padded_to_32(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=16)
    dm.setup("fit")
    ds = dm.train_set
    assert len(ds) == 60000
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.all(ds.images[:, :, :2] == 0) and torch.all(
        ds.images[:, :, :, -2:] == 0
    )  # padding = -1
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, :2] == -1) and x.max() > 0
    assert set(ds.labels.unique().tolist()) == set(range(10))
    sub = FashionMNISTDataModule(str(tmp_path), subset=100, channels=3)
    sub.setup()
    assert len(sub.train_set) == 100 and sub.train_set[0][0].shape == (3, 32, 32)
    assert dm.real_images(5, split="test").shape == (5, 1, 32, 32)
    big = FashionMNISTDataModule(str(tmp_path), subset=10, resolution=64)  # resized, not padded
    big.setup()
    assert big.train_set.images.shape == (10, 1, 64, 64)
    assert big.train_set.images[:, :, 8:56, 8:56].float().mean() > 0
    # a datamodule resumed at batch k yields batches k.. of the uninterrupted loader
    dm.start_batch = 0
    full = [b for _, b in zip(range(3), dm.train_dataloader())]
    dm.start_batch = 2
    x2, y2 = next(iter(dm.train_dataloader()))
    assert torch.equal(x2, full[2][0]) and torch.equal(y2, full[2][1])


def test_missing_fashion_mnist_fails_fast_naming_data_dir(
    tmp_path: Path, offline, monkeypatch
) -> None:
    monkeypatch.setattr(datamodules.FashionMNISTDataModule, "system_dirs", ())
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"dataset.data_dir=.*train-images-idx3-ubyte"):
        FashionMNISTDataModule(str(tmp_path / "none")).setup()
    assert time.perf_counter() - start < 5


def test_missing_mnist_fails_fast_naming_data_dir(tmp_path: Path, offline) -> None:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"dataset.data_dir=.*train-images-idx3-ubyte"):
        MNISTDataModule(str(tmp_path)).setup()
    assert time.perf_counter() - start < 5


def test_online_probe_is_bounded() -> None:
    start = time.perf_counter()
    datamodules.online("10.255.255.1", 81, timeout=0.5)  # unroutable: must give up on time
    assert time.perf_counter() - start < 2


def _dataset(n: int = 40) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    images[:, :, :, 0] = 255  # left column bright: flips are visible
    return TensorImageDataset(images, torch.arange(n))


def test_step_loader_is_deterministic_resumable_and_flips() -> None:
    ds = _dataset()
    full = list(StepLoader(ds, 8, seed=3))
    again = list(StepLoader(ds, 8, seed=3))
    for (a, la), (b, lb) in zip(full, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # batches 2.. of a loader started at batch 2 (across an epoch boundary: 5 batches per epoch)
    first = StepLoader(ds, 8, seed=3)
    seq = []
    for _ in range(2):
        seq += list(first)
    resumed = StepLoader(ds, 8, seed=3, start_batch=3)
    seq_r = list(resumed) + list(resumed)
    for (a, la), (b, lb) in zip(seq[3:], seq_r, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    flipped = torch.cat([x[:, 0, 0, -1] for x, _ in full]) == 1.0
    assert 0 < flipped.sum() < len(flipped)
    assert not torch.equal(torch.cat([y for _, y in full]), torch.arange(40))  # shuffled
    with pytest.raises(ValueError, match="dataset.batch_size"):
        StepLoader(ds, 41)


def test_fake_cifar10_pickles(tmp_path: Path, offline) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]},
                fh,
            )
    dm = CIFAR10DataModule(str(tmp_path), batch_size=4, channels=3)
    dm.setup()
    assert len(dm.train_set) == 20 and dm.train_set[0][0].shape == (3, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match=r"dataset.data_dir=.*data_batch_1\.\.5 and test_batch"
    ):
        CIFAR10DataModule(str(tmp_path / "nothing"), channels=3).setup()
    assert time.perf_counter() - start < 5


def test_image_folder_with_and_without_classes(tmp_path: Path) -> None:
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 60, 3), 50 * i, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    dm = ImageFolderDataModule(
        str(tmp_path), batch_size=2, resolution=16, channels=3, num_classes=2
    )
    dm.setup()
    assert len(dm.train_set) == 6 and dm.train_set[0][0].shape == (3, 16, 16)
    assert sorted(dm.train_set.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    grey = ImageFolderDataModule(str(tmp_path), resolution=8, channels=1, num_classes=0)
    grey.setup()
    assert grey.train_set[0][0].shape == (1, 8, 8) and set(grey.train_set.labels.tolist()) == {0}
    with pytest.raises(FileNotFoundError, match="dataset.data_dir"):
        ImageFolderDataModule(str(tmp_path / "empty"), num_classes=0).setup()
    with pytest.raises(ValueError, match="dataset.num_classes=5"):
        ImageFolderDataModule(str(tmp_path), num_classes=5).setup()


def test_gaussian_mixture_is_deterministic_with_the_right_statistics() -> None:
    a = GaussianMixtureDataModule(length=400, resolution=8, channels=3, std=0.05)
    b = GaussianMixtureDataModule(length=400, resolution=8, channels=3, std=0.05)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.images, b.train_set.images)
    x = a.train_set.images.float() / 127.5 - 1
    resid = x - a.means[a.train_set.labels]
    assert resid.std().item() == pytest.approx(0.05, rel=0.1)
    assert a.weights.sum().item() == pytest.approx(1.0)


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match="dataset.batch_size"):
        GaussianMixtureDataModule(batch_size=0)
    with pytest.raises(ValueError, match="dataset.channels"):
        GaussianMixtureDataModule(channels=2)
    with pytest.raises(ValueError, match="dataset.subset"):
        GaussianMixtureDataModule(subset=0)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "gaussian_mixture"])
def test_dataset_configs_instantiate(name: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"dataset={name}",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}",
            ],
        )
    dm = instantiate(cfg.dataset)
    assert dm.batch_size == cfg.dataset.batch_size and dm.resolution == 32
    if name == "gaussian_mixture":
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (cfg.dataset.batch_size, 3, 32, 32) and y.max() < 4


def test_imagefolder_config_requires_and_uses_data_dir(tmp_path: Path) -> None:
    from omegaconf.errors import MissingMandatoryValue

    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=imagefolder", f"paths.root_dir={tmp_path}"])
        with pytest.raises(MissingMandatoryValue):
            _ = cfg.dataset.data_dir
        cfg = compose(
            "train",
            overrides=[
                "dataset=imagefolder",
                f"dataset.data_dir={tmp_path}",
                "dataset.batch_size=2",
                "dataset.num_workers=0",
            ],
        )
    dm = instantiate(cfg.dataset)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)
