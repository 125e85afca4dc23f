"""Checkpoint bookkeeping every LightningModule of the suite shares: the training wall time,
summed over resumed runs and written into checkpoints."""

from __future__ import annotations

import time


class TrainingClock:
    """Mixin: ``train_seconds`` accumulates the wall time of every run of a training (set it
    from a checkpoint on resume); :meth:`elapsed` is that plus this run's time so far."""

    train_seconds: float = 0.0
    _clock: float | None = None

    def start_clock(self) -> None:
        """Start timing this run (``on_train_start``)."""
        self._clock = time.perf_counter()

    def elapsed(self) -> float:
        """Training wall time so far: the resumed runs' plus this run's."""
        running = time.perf_counter() - self._clock if self._clock is not None else 0.0
        return self.train_seconds + running

    def stop_clock(self) -> None:
        """Fold this run's time into ``train_seconds`` (``on_train_end``)."""
        self.train_seconds, self._clock = self.elapsed(), None
