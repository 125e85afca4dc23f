"""A resumable training loader: batch number b is a pure function of (seed, b).

Lightning re-creates the training iterator each epoch and, on resume, continues inside the
epoch it stopped in. Because the permutation of epoch e is seeded by (seed, e) and the flips of
batch b by (seed, b), a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen, without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def mix(*ints: int) -> int:
    h = 0x9E3779B97F4A7C15
    for i in ints:
        h = (h ^ (int(i) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & ((1 << 63) - 1)
    return h


class StepLoader:
    """Iterable of ``(images [B,C,H,W], labels [B])`` training batches, ``drop_last`` semantics.

    Args:
        dataset: map-style dataset of ``(image [C,H,W] float in [-1,1], label int)``.
        batch_size: per-process batch size.
        seed: data-order seed (combined with the process rank under DDP).
        random_flip: flip each image horizontally with probability 1/2 (CM paper App. C).
        num_workers: DataLoader workers used to fetch the examples of a batch.
        start_batch: global index of the first batch to yield (set on resume).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        random_flip: bool = True,
        num_workers: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if batch_size * world_size > n:
            raise ValueError(
                f"dataset.batch_size={batch_size} x {world_size} process(es) exceeds the {n} "
                "training images; lower dataset.batch_size or raise dataset.subset"
            )
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.random_flip, self.num_workers = bool(random_flip), int(num_workers)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = int(start_batch)
        self.batches_per_epoch = n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch_indices(self, b: int) -> Tensor:
        """Dataset indices of global batch ``b`` for this rank."""
        epoch, i = divmod(b, self.batches_per_epoch)
        gen = torch.Generator().manual_seed(mix(self.seed, epoch))
        perm = torch.randperm(len(self.dataset), generator=gen)  # type: ignore[arg-type]
        per_step = self.batch_size * self.world_size
        chunk = perm[i * per_step : (i + 1) * per_step]
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        first = self.start_batch
        epoch = first // self.batches_per_epoch
        last = (epoch + 1) * self.batches_per_epoch
        sampler = [self.batch_indices(b).tolist() for b in range(first, last)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(mix(self.seed, epoch, 1)),
            persistent_workers=False,
        )
        for b, (images, labels) in enumerate(loader, start=first):
            self.start_batch = b + 1
            if self.random_flip:
                # drawn for the whole global batch, then this rank's slice (= one process's flips)
                gen = torch.Generator().manual_seed(mix(self.seed, b, 2, 0))
                n = images.shape[0]
                flip = (
                    torch.rand(n * self.world_size, generator=gen)[
                        self.rank * n : (self.rank + 1) * n
                    ]
                    < 0.5
                )
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            yield images, torch.as_tensor(labels, dtype=torch.long)
        self.start_batch = last
