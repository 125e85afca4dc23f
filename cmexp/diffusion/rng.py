"""Randomness shared by every training method: global-batch draws that make DDP runs equal a
single process (:func:`global_draw`) and RNG replay for identical dropout masks in two passes
(:func:`replay_rng`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor


def global_draw(
    draw: Callable[[int], Tensor], local: int, shard: tuple[int, int] = (0, 1)
) -> Tensor:
    """``draw(local * world_size)`` sliced to this rank's ``local`` rows: with the same RNG
    state on every rank (``seed_everything``), rank r gets rows r*local..(r+1)*local-1 of what
    a single process with the global batch draws."""
    rank, world = shard
    if world == 1:
        return draw(local)
    return draw(local * world)[rank * local : (rank + 1) * local]


@contextmanager
def replay_rng(device: torch.device) -> Iterator[Callable[[], AbstractContextManager[None]]]:
    """Capture the RNG state of ``device`` now; the yielded context manager replays it.

    Used so the online and target passes see the same dropout mask (official code; iCT).
    The global stream continues afterwards as if the replay had not happened.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay() -> Iterator[None]:
        devices = [device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            yield

    yield replay
