"""Sample grids from the sampling EMA every K steps, saved as PNG and logged as uint8."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from cmexp.utils.images import image_grid, save_png


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) draw
    ``num_samples`` images from fixed seeds with ``pl_module.sample_sets`` (1- and 2-step
    for CD/CT, Heun for EDM), write ``<dirpath>/<name>_step<k>.png`` and log them to W&B.

    Args:
        dirpath: folder for the PNGs (``${paths.output_dir}/samples``).
        every_n_steps: cadence; 0 disables periodic grids (the final grid is still written).
        num_samples: images per grid. seed: first seed (seeds are seed..seed+num-1).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        scale: int = 2,
    ) -> None:
        if every_n_steps < 0 or num_samples < 1:
            raise ValueError(
                "callbacks.sample_grid: every_n_steps must be >= 0 and num_samples >= 1"
            )
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.num_samples = int(every_n_steps), int(num_samples)
        self.seed, self.scale = int(seed), int(scale)
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        ):
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            sets = pl_module.sample_sets(self.num_samples, seed=self.seed)
        finally:
            pl_module.train(was_training)
        for name, images in sets.items():
            grid = image_grid(images)
            save_png(grid, self.dirpath / f"{name}_step{step:07d}.png", scale=self.scale)
            save_png(grid, self.dirpath / f"{name}_last.png", scale=self.scale)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"samples/{name}", images=[grid], step=step)
