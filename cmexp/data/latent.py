"""Training data of latent mode: the image datamodule's training set encoded once into scaled
latents, kept in memory, and served by the same resumable :class:`StepLoader`.

Why a cache and not an encode step in ``training_step``: the autoencoder is frozen, so the
latents of an image never change; encoding Fashion-MNIST once (60k x 4 x 8 x 8 float32 =
61 MB, x 2 with flips) costs about one encoder pass per image, where encoding on the fly would
cost one per image *per visit* and would make every training mode's step pay for it. Random
flips are done on the images before encoding: the cache holds each image and its mirror image
(a flip of a latent is not the latent of the flipped image), and an epoch visits both.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cmexp.data.loader import StepLoader
from cmexp.nets.autoencoder import LatentCodec

log = logging.getLogger(__name__)


class LatentDataset(Dataset):
    """Latents ``[N, z, h, w]`` (float32) and labels ``[N]`` -> ``(latent [z,h,w], label)``."""

    def __init__(self, latents: Tensor, labels: Tensor) -> None:
        self.latents, self.labels = latents, labels.long()

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.latents[i], int(self.labels[i])


@torch.no_grad()
def encode_images(codec: LatentCodec, images: Tensor, batch_size: int = 500) -> Tensor:
    """uint8 images ``[N, C, H, W]`` -> scaled latents ``[N, z, h, w]`` (float32, CPU)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float() / 127.5 - 1.0
        out.append(codec.encode(x.to(codec.scale.device)).cpu())
    return (
        torch.cat(out)
        if out
        else torch.empty(0, codec.channels, codec.resolution, codec.resolution)
    )


class LatentDataModule(pl.LightningDataModule):
    """Wraps an image datamodule (``dataset`` config): training batches are scaled latents
    ``[B, z, h, w]``; everything that needs images (the reference set of sample metrics,
    ``real_images``, ``dataset(split)``) still gets the images.

    Args:
        images: the image datamodule (:class:`cmexp.data.ImageDataModule`).
        codec: the frozen autoencoder and scale (:class:`cmexp.nets.autoencoder.LatentCodec`).
        encode_batch_size: images per encoder call when building the cache.
    """

    def __init__(
        self, images: pl.LightningDataModule, codec: LatentCodec, encode_batch_size: int = 500
    ) -> None:
        super().__init__()
        if encode_batch_size < 1:
            raise ValueError(f"latent.encode_batch_size must be >= 1, got {encode_batch_size}")
        self.images, self.codec, self.encode_batch_size = images, codec, int(encode_batch_size)
        self.start_batch = 0
        self.train_set: LatentDataset | None = None
        self.encode_seconds = 0.0

    # the image datamodule's settings (batch size, seeds, reference data) ---------------------
    @property
    def batch_size(self) -> int:
        return int(self.images.batch_size)

    @property
    def resolution(self) -> int:
        return int(self.images.resolution)

    @property
    def channels(self) -> int:
        return int(self.images.channels)

    @property
    def reference_name(self) -> str:
        """The image datamodule's name: real-feature caches are shared with pixel runs."""
        return type(self.images).__name__

    def real_images(self, n: int, split: str = "train") -> Tensor:
        return self.images.real_images(n, split)

    def dataset(self, split: str = "train") -> Any:  # the image datamodule's dataset
        return self.images.dataset(split)

    # Lightning ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.images.setup(stage)
        pixels = self.images.train_set
        images, labels = pixels.images, pixels.labels
        if getattr(self.images, "random_flip", False):
            images, labels = torch.cat([images, images.flip(-1)]), torch.cat([labels, labels])
        t0 = time.perf_counter()
        latents = encode_images(self.codec, images, self.encode_batch_size)
        self.encode_seconds = time.perf_counter() - t0
        log.info(
            "encoded %d training images into %s latents in %.1f s",
            len(images),
            tuple(latents.shape[1:]),
            self.encode_seconds,
        )
        self.train_set = LatentDataset(latents, labels)

    def train_dataloader(self) -> StepLoader:
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StepLoader(
            self.train_set,
            self.batch_size,
            seed=int(self.images.seed),
            random_flip=False,
            num_workers=0,
            start_batch=self.start_batch,
            rank=rank,
            world_size=world,
        )
