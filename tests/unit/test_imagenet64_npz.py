"""``dataset=imagenet64`` (:class:`cmexp.data.ImageNet64DataModule`) reads the downsampled-ImageNet
npz files (``data`` uint8 ``[N, 12288]``, planar RGB; ``labels`` 1-based), and still reads a
folder of class subfolders; malformed files are named in one error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmexp.data import ImageNet64DataModule


def _write(path: Path, labels: list[int], seed: int = 0) -> np.ndarray:
    """Images whose R, G, B planes are constant 10 + i, 100 + i, 200 + i (image i), plus noise
    in one pixel, stored as the release does: R plane, G plane, B plane, each row-major."""
    n = len(labels)
    img = np.zeros((n, 3, 64, 64), dtype=np.uint8)
    for i in range(n):
        img[i, 0], img[i, 1], img[i, 2] = 10 + i, 100 + i, 200 + i
        img[i, 0, 3, 5] = np.random.default_rng(seed + i).integers(0, 255)
    np.savez(path, data=img.reshape(n, -1), labels=np.array(labels), mean=np.zeros(12288))
    return img


def test_npz_parts_planar_rgb_and_one_based_labels(tmp_path: Path) -> None:
    a = _write(tmp_path / "Imagenet64_train_part1.npz", [1, 1000, 5])
    b = _write(tmp_path / "Imagenet64_train_part2.npz", [2], seed=9)
    v = _write(tmp_path / "Imagenet64_val_data.npz", [7, 8])
    dm = ImageNet64DataModule(str(tmp_path), resolution=64, channels=3, num_classes=1000)
    x, y = dm.load("train")
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 64, 64)
    assert torch.equal(x, torch.from_numpy(np.concatenate([a, b])))  # R, G, B planes in order
    assert (x[1, 0, 0, 0], x[1, 1, 0, 0], x[1, 2, 0, 0]) == (11, 101, 201)
    assert y.tolist() == [0, 999, 4, 1]
    xv, yv = dm.load("test")
    assert torch.equal(xv, torch.from_numpy(v)) and yv.tolist() == [6, 7]
    sub = ImageNet64DataModule(
        str(tmp_path), resolution=64, channels=3, num_classes=1000, subset=2
    )
    assert len(sub.dataset("train")) == 2
    real = dm.real_images(3, "test")  # what cmexp.edit / tau_search read
    assert real.shape == (2, 3, 64, 64) and real.min() >= -1 and real.max() <= 1


def test_a_folder_of_class_subfolders_still_works(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("n01", "n02"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((80, 80, 3), 40, dtype=np.uint8)).save(tmp_path / c / "0.png")
    x, y = ImageNet64DataModule(str(tmp_path), resolution=64, channels=3, num_classes=2).load(
        "train"
    )
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 1]


def test_malformed_npz_files_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "Imagenet64_train_part1.npz", data=np.zeros((2, 12288), dtype=np.uint8))
    dm = ImageNet64DataModule(
        str(tmp_path), resolution=64, channels=3, num_classes=1000, key="data_dir"
    )
    with pytest.raises(
        ValueError,
        match=r"^data_dir=.*: Imagenet64_train_part1.npz is not a downsampled-ImageNet npz",
    ):
        dm.load("train")
    with pytest.raises(
        FileNotFoundError, match=r"no test file among its npz files \(Imagenet64_train_part1.npz\)"
    ):
        dm.load("test")
    np.savez(
        tmp_path / "Imagenet64_train_part1.npz",
        data=np.zeros((2, 3072), dtype=np.uint8),
        labels=[1, 2],
    )
    with pytest.raises(
        ValueError,
        match=r"holds 'data' uint8 \[2, 3072\] and 2 labels; expected uint8 \[N, 12288\]",
    ):
        dm.load("train")
    _write(tmp_path / "Imagenet64_train_part1.npz", [0, 3])
    with pytest.raises(ValueError, match=r"labels run from 0 to 3; expected 1..1000"):
        dm.load("train")
