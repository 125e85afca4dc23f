"""LightningDataModules for the training suite. Images are float32 ``[C, H, W]`` in [-1, 1].

Every module trains through :class:`cmexp.data.loader.StepLoader`, so batch b is a pure
function of (seed, b) and a resumed run sees exactly the batches of the uninterrupted one
(``start_batch`` is set from the checkpoint before ``train_dataloader`` is called).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cmexp.data.loader import StepLoader
from cmexp.utils.checks import IMAGE_SUFFIXES
from cmexp.utils.network import online

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class TensorImageDataset(Dataset):
    """uint8 images ``[N, C, H, W]`` (in memory) -> ``(float [C,H,W] in [-1,1], label)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}"
            )
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])


def fit_images(
    images: Tensor, resolution: int, channels: int, pad_from: int | None = None
) -> Tensor:
    """uint8 ``[N, C0, H0, W0]`` -> uint8 ``[N, channels, resolution, resolution]``.

    If ``pad_from`` equals H0 (28 for the MNIST family) and ``resolution == H0 + 4`` (32), the
    images are padded with 2 pixels of background 0 (-1 after scaling) on each side; any other
    size change is a resize (bilinear, antialiased). 1 -> 3 channels repeats grey, 3 -> 1 takes
    the luma (ITU-R 601).
    """
    n, c0, h0, w0 = images.shape
    if h0 != resolution or w0 != resolution:
        if pad_from == h0 and h0 == w0 and resolution == h0 + 4:
            p = 2
            images = F.pad(images, (p, p, p, p), value=0)
        else:
            x = F.interpolate(
                images.float(),
                size=(resolution, resolution),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            images = x.round().clamp(0, 255).to(torch.uint8)
    if channels != c0:
        if c0 == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif c0 == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (
                (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            )
        else:
            raise ValueError(
                f"dataset.channels={channels} cannot be made from {c0}-channel images"
            )
    return images


class ImageDataModule(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`load` returning uint8 images and labels.

    Args:
        data_dir: dataset folder (``dataset.data_dir``).
        batch_size: per-process batch size (global batch = batch_size x devices x nodes).
        num_workers: DataLoader workers. random_flip: horizontal flips (CM paper App. C).
        subset: keep only the first ``subset`` training images (quick runs, tests).
        resolution, channels: image size and channel count the networks see.
        num_classes: number of classes (for class-conditional nets).
        use_labels: class-conditional training (``dataset.use_labels``; the nets' ``label_dim``
            follows it in the config); needs a labelled dataset (``num_classes`` > 0).
        seed: data-order seed (``${seed}``).
    """

    pad_from: int | None = None

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = True,
        subset: int | None = None,
        resolution: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        seed: int = 0,
        use_labels: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if subset is not None and subset < 1:
            raise ValueError(f"dataset.subset must be null or >= 1, got {subset}")
        if resolution < 4:
            raise ValueError(f"dataset.resolution must be >= 4, got {resolution}")
        if channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 or 3, got {channels}")
        self.data_dir = Path(str(data_dir)).expanduser()
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.random_flip, self.subset = bool(random_flip), subset
        self.resolution, self.channels, self.num_classes = (
            int(resolution),
            int(channels),
            int(num_classes),
        )
        self.seed = int(seed)
        if use_labels and self.num_classes < 1:
            raise ValueError(
                f"dataset.use_labels=true but dataset.num_classes={self.num_classes}: this dataset has no class "
                "labels (an image folder needs one subfolder per class and dataset.num_classes set to their count)"
            )
        self.use_labels = bool(use_labels)
        self.start_batch = 0
        self.train_set: TensorImageDataset | None = None

    # subclasses -----------------------------------------------------------------------------
    def load(self, split: str) -> tuple[Tensor, Tensor]:
        """uint8 images ``[N, C, H, W]`` and int labels ``[N]`` of ``split`` ("train"/"test")."""
        raise NotImplementedError

    # Lightning ------------------------------------------------------------------------------
    def dataset(self, split: str = "train") -> TensorImageDataset:
        images, labels = self.load(split)
        images = fit_images(images, self.resolution, self.channels, self.pad_from)
        if self.subset is not None and split == "train":
            images, labels = images[: self.subset], labels[: self.subset]
        return TensorImageDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.dataset("train")

    def train_dataloader(self) -> StepLoader:
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StepLoader(
            self.train_set,
            self.batch_size,
            seed=self.seed,
            random_flip=self.random_flip,
            num_workers=self.num_workers,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world,
        )

    def real_labels(self, n: int, split: str = "train") -> Tensor:
        """The labels ``[n]`` of :meth:`real_images` (same images, same order)."""
        ds = (
            self.train_set
            if split == "train" and self.train_set is not None
            else self.dataset(split)
        )
        return ds.labels[: min(n, len(ds))].clone()

    def real_images(self, n: int, split: str = "train") -> Tensor:
        """The first ``n`` images of ``split`` as float ``[n, C, H, W]`` in [-1, 1]."""
        ds = (
            self.train_set
            if split == "train" and self.train_set is not None
            else self.dataset(split)
        )
        n = min(n, len(ds))
        return ds.images[:n].float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# MNIST-format datasets (idx files)
# ---------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): uint8 images ``[N, H, W]`` or labels ``[N]``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an idx uint8 file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


class IdxDataModule(ImageDataModule):
    """MNIST-format data: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``data_dir``,
    ``data_dir/<Name>/raw`` (torchvision's layout) or a system folder; else a torchvision
    download into ``data_dir`` when the network is reachable."""

    name = "MNIST"
    host = "ossci-datasets.s3.amazonaws.com"
    system_dirs: tuple[Path, ...] = ()
    apt_hint = ""
    pad_from = 28

    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def _find(self, stem: str) -> Path | None:
        for folder in (self.data_dir, self.data_dir / self.name / "raw", *self.system_dirs):
            for suffix in ("", ".gz"):
                if (folder / (stem + suffix)).is_file():
                    return folder / (stem + suffix)
        return None

    def _download(self) -> None:
        import torchvision

        getattr(torchvision.datasets, self.name)(str(self.data_dir), train=True, download=True)
        getattr(torchvision.datasets, self.name)(str(self.data_dir), train=False, download=True)

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        stems = self.FILES[split]
        paths = [self._find(s) for s in stems]
        if any(p is None for p in paths):
            if online(self.host):
                try:
                    self._download()
                except Exception as err:  # noqa: BLE001 - reported below with the expected files
                    print(f"warning: downloading {self.name} failed: {err}")
                paths = [self._find(s) for s in stems]
            if any(p is None for p in paths):
                where = ", ".join(str(d) for d in (self.data_dir, *self.system_dirs))
                raise FileNotFoundError(
                    f"dataset.data_dir={self.data_dir}: {self.name} files {stems[0]}[.gz] and "
                    f"{stems[1]}[.gz] not found (looked in {where}) and no network to download "
                    f"them{self.apt_hint}"
                )
        images = torch.from_numpy(read_idx(paths[0]).copy())[:, None]
        labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
        return images, labels


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST (Xiao et al. 2017), 60k 28x28 grey training images, 10 classes; padded
    with 2 background pixels (-1) per side to 32x32 (another ``resolution`` is resized, bilinear
    with antialiasing). Read from
    ``data_dir`` or Debian's ``/usr/share/datasets/fashion-mnist`` (package
    ``dataset-fashion-mnist``)."""

    name = "FashionMNIST"
    host = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
    system_dirs = (SYSTEM_FASHION_MNIST,)
    apt_hint = "; on Debian/Ubuntu: apt-get install dataset-fashion-mnist"


class MNISTDataModule(IdxDataModule):
    """MNIST digits, padded to 32x32 like Fashion-MNIST."""

    name = "MNIST"


# ---------------------------------------------------------------------------------------------
# CIFAR-10, image folders, synthetic mixture
# ---------------------------------------------------------------------------------------------


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (the CM paper's main benchmark): 50k 32x32 RGB training images. Reads the python
    pickles in ``data_dir/cifar-10-batches-py``; downloads them with torchvision when online."""

    BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        folder = self.data_dir / "cifar-10-batches-py"
        files = [folder / f for f in self.BATCHES[split]]
        if not all(f.is_file() for f in files):
            if online("www.cs.toronto.edu"):
                import torchvision

                try:
                    torchvision.datasets.CIFAR10(
                        str(self.data_dir), train=split == "train", download=True
                    )
                except Exception as err:  # noqa: BLE001 - reported below with the expected files
                    print(f"warning: downloading CIFAR-10 failed: {err}")
            if not all(f.is_file() for f in files):
                raise FileNotFoundError(
                    f"dataset.data_dir={self.data_dir}: CIFAR-10 not found; expected {folder}/"
                    "data_batch_1..5 and test_batch (extract cifar-10-python.tar.gz from "
                    "https://www.cs.toronto.edu/~kriz/cifar.html there), and there is no network"
                )
        images, labels = [], []
        for f in files:
            with open(f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry.get("labels", entry.get("fine_labels", [])))
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images (recursive; png/jpg/jpeg/webp/bmp), e.g. LSUN or ImageNet-64
    exports: centre-cropped and resized to ``resolution``. With ``num_classes > 0`` the labels
    are the sorted first-level subfolder names, else all 0. ``key`` is the config key that
    named the folder (errors name it and the offending file)."""

    def __init__(self, *args, key: str = "dataset.data_dir", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        from PIL import Image, UnidentifiedImageError

        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"{self.key}={self.data_dir}: no such folder of images")
        files = sorted(p for p in self.data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"{self.key}={self.data_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found"
            )
        classes = sorted(
            {p.relative_to(self.data_dir).parts[0] for p in files if p.parent != self.data_dir}
        )
        if self.num_classes > 0 and len(classes) != self.num_classes:
            raise ValueError(
                f"dataset.num_classes={self.num_classes} but {self.data_dir} has {len(classes)} class subfolders"
            )
        mode = "L" if self.channels == 1 else "RGB"
        out, labels = [], []
        for p in files:
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    w, h = im.size
                    s = min(w, h)
                    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    im = im.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise ValueError(
                    f"{self.key}={self.data_dir}: {p} is not a readable image ({type(err).__name__}); "
                    "remove it from the folder or replace it"
                ) from None
            out.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(
                classes.index(p.relative_to(self.data_dir).parts[0]) if self.num_classes > 0 else 0
            )
        return torch.from_numpy(np.stack(out)), torch.tensor(labels, dtype=torch.long)


class ImageNet64DataModule(ImageFolderDataModule):
    """ImageNet 64x64 (``dataset=imagenet64``) from the downsampled-ImageNet npz files of
    Chrabaszcz et al. (2017) when ``data_dir`` holds them, else from a folder of class
    subfolders (:class:`ImageFolderDataModule`).

    npz files: ``data`` uint8 ``[N, 3 * 64 * 64]`` (planar: the R plane, then G, then B, each
    row-major) and ``labels`` 1..1000 (1-based); the train split reads every file whose name holds
    "train" (``Imagenet64_train_part1.npz``, ``..._part2.npz``), the test split those holding "val"
    (``Imagenet64_val_data.npz``). Each file is read whole into memory (about 7.9 GB per train part).
    """

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        files = sorted(self.data_dir.glob("*.npz")) if self.data_dir.is_dir() else []
        if not files:
            return super().load(split)
        words = ("train",) if split == "train" else ("val", "test")
        parts = [f for f in files if any(w in f.name.lower() for w in words)]
        if not parts:
            raise FileNotFoundError(
                f"{self.key}={self.data_dir}: no {split} file among its npz files "
                f"({', '.join(f.name for f in files[:3])}); expected names holding {' or '.join(words)!r}"
            )
        images, labels = [], []
        for f in parts:
            try:
                with np.load(f) as npz:
                    data, lab = np.asarray(npz["data"]), np.asarray(npz["labels"])
            except (KeyError, ValueError, OSError) as err:
                raise ValueError(
                    f"{self.key}={self.data_dir}: {f.name} is not a downsampled-ImageNet npz "
                    f"('data' uint8 [N, 12288] and 'labels'): {type(err).__name__}"
                ) from None
            side = self.resolution
            if (
                data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 3 * side * side
                or len(lab) != len(data)
            ):
                raise ValueError(
                    f"{self.key}={self.data_dir}: {f.name} holds 'data' {data.dtype} {list(data.shape)} and "
                    f"{len(lab)} labels; expected uint8 [N, {3 * side * side}] (3x{side}x{side}, "
                    f"dataset.resolution={side}) and N labels"
                )
            images.append(data.reshape(-1, 3, side, side))
            labels.append(lab.astype(np.int64).reshape(-1) - 1)  # 1-based in the files
        y = np.concatenate(labels)
        if self.num_classes > 0 and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"{self.key}={self.data_dir}: labels run from {y.min() + 1} to {y.max() + 1}; expected "
                f"1..{self.num_classes} (dataset.num_classes={self.num_classes}, 1-based in the files)"
            )
        if self.num_classes == 0:
            y = np.zeros_like(y)
        x = np.concatenate(images)
        if self.channels == 1:
            x = np.round(x.astype(np.float32).mean(1, keepdims=True)).astype(np.uint8)
        return torch.from_numpy(x), torch.from_numpy(y)


class GaussianMixtureDataModule(ImageDataModule):
    """Synthetic images from a mixture of ``num_components`` Gaussians in pixel space (for tests),
    ``length`` images per split:
    means uniform in [-0.8, 0.8] per pixel, isotropic ``std``, equal weights; quantised to uint8
    like real data. Deterministic from ``mixture_seed``; labels are component indices."""

    def __init__(
        self,
        *args,
        length: int = 256,
        num_components: int = 4,
        std: float = 0.1,
        mixture_seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("data_dir", "")
        super().__init__(*args, **kwargs)
        if length < 1:
            raise ValueError(f"dataset.length must be >= 1, got {length}")
        self.length, self.num_components, self.std = int(length), int(num_components), float(std)
        gen = torch.Generator().manual_seed(int(mixture_seed))
        shape = (self.num_components, self.channels, self.resolution, self.resolution)
        self.means = torch.rand(shape, generator=gen) * 1.6 - 0.8
        self.weights = torch.full((self.num_components,), 1.0 / self.num_components)
        self._gen_seed = int(mixture_seed) + 1

    def load(self, split: str) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self._gen_seed + (split != "train"))
        labels = torch.randint(0, self.num_components, (self.length,), generator=gen)
        x = self.means[labels] + self.std * torch.randn(
            (self.length, *self.means.shape[1:]), generator=gen
        )
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images, labels
