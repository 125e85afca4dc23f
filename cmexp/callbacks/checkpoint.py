"""The periodic checkpoint of every run, with ``last.ckpt`` at the run's final step."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends at a
    step that is not a multiple of ``every_n_train_steps``.

    Lightning (2.6) writes ``last.ckpt`` at the end of training only if no checkpoint was saved
    before, so a 1200-step run with ``every_n_train_steps=500`` ended with ``last.ckpt`` holding
    step 1000: the last 200 steps were trained, scored and lost. A run stopped by an exception
    (non-finite loss, preemption: :class:`~cmexp.callbacks.PreemptionCallback` saves its own)
    does not reach ``on_train_end`` and keeps its last good checkpoint.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
