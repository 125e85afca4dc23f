"""In-training sample quality: FD / KID / IS / precision-recall of the sampling-EMA model."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from cmexp.metrics.suite import RealFeatureCache, describe, extract, reference_features, score

log = logging.getLogger(__name__)


class SampleQualityCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) sample
    ``num_samples`` images from fixed seeds with ``pl_module.sample_sets`` (sampling EMA, decoded for latent models;
    CD/CT: 1 and 2 steps with the run's tau, EDM: its Heun sampler) and log, per sample set
    ``S``: ``val/fd_<name>_S``, ``val/kid_<name>_S``, ``val/is_<name>_S`` (extractors with
    logits), ``val/precision_S``, ``val/recall_S``, ``<name>`` being the extractor's (``fmnist``).

    Real features (``num_real`` images of ``real_split``) are computed once and cached in
    ``cache_dir`` under (dataset, split, resolution, extractor, weights hash, count). Under DDP
    each rank samples its share of the seeds and the features are all-gathered.

    Args:
        features: a feature extractor (``cmexp.metrics.ClassifierFeatures``, Inception...), or
            a factory that builds one when training starts.
        every_n_steps: cadence (0 = only at the end of training).
        optional: when the factory cannot find the extractor's weights (FileNotFoundError),
            warn once and skip the metrics instead of failing (the Fashion-MNIST experiments'
            default: the classifier is trained separately).
    """

    def __init__(
        self,
        features: nn.Module | Callable[[], nn.Module],
        cache_dir: str,
        every_n_steps: int = 1000,
        num_samples: int = 1000,
        num_real: int = 10000,
        real_split: str = "train",
        seed: int = 0,
        batch_size: int = 250,
        kid_subset_size: int = 1000,
        optional: bool = False,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if every_n_steps < 0 or num_samples < 2 or num_real < 2 or batch_size < 1:
            raise ValueError(
                "callbacks.sample_quality: every_n_steps >= 0, num_samples >= 2, num_real >= 2, batch_size >= 1"
            )
        self._factory = None if isinstance(features, nn.Module) else features
        self.features = features.eval() if isinstance(features, nn.Module) else None
        self.sample_shape = tuple(int(v) for v in sample_shape) if sample_shape else None
        self._check_input()
        self.optional = bool(optional)
        self.disabled = False
        self.cache = RealFeatureCache(cache_dir)
        self.every_n_steps, self.num_samples, self.num_real = (
            int(every_n_steps),
            int(num_samples),
            int(num_real),
        )
        self.real_split, self.seed, self.batch_size = str(real_split), int(seed), int(batch_size)
        self.kid_subset_size = int(kid_subset_size)
        self.name = str(getattr(self.features, "name", "features"))
        self._last_step = -1
        self._last: dict[str, float] = {}
        self.seconds = 0.0  # total wall time spent here (BENCHMARKS.md: cost vs training)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.features is not None or self.disabled:
            return
        try:
            self.features = self._factory().eval()
        except FileNotFoundError as err:
            if not self.optional:
                raise
            self.disabled = True
            log.warning("sample-quality metrics skipped: %s", str(err).splitlines()[0])
            return
        self.name = str(getattr(self.features, "name", "features"))
        self._check_input()

    def _check_input(self) -> None:
        """The extractor scores this run's samples (``sample_shape``: channels, resolution):
        the Fashion-MNIST classifier's numbers of RGB or other-sized samples mean nothing.
        A ValueError naming ``callbacks.sample_quality.features`` (the ``quality=`` group)."""
        if self.features is None or self.sample_shape is None:
            return
        from cmexp.metrics.features import check_feature_input

        channels, resolution = self.sample_shape
        try:
            check_feature_input(self.features, channels, resolution, "this run's samples")
        except ValueError as err:
            raise ValueError(
                f"callbacks.sample_quality.features: {err}".replace(
                    "use features=inception", "use quality=inception or quality=none"
                )
            ) from None

    def _real(self, trainer: pl.Trainer, device: torch.device) -> dict[str, torch.Tensor]:
        return reference_features(
            self.cache,
            self.features,
            trainer.datamodule,
            self.real_split,
            self.num_real,
            self.batch_size,
            device,
        )

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        t0 = time.perf_counter()
        device = pl_module.device
        self.features.to(device)
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = math.ceil(self.num_samples / world)
        start = self.seed + rank * per_rank
        was_training = pl_module.training
        pl_module.eval()
        sets: dict[str, list[torch.Tensor]] = {}
        try:
            for off in range(0, per_rank, self.batch_size):
                n = min(self.batch_size, per_rank - off)
                for name, images in pl_module.sample_sets(n, seed=start + off).items():
                    sets.setdefault(name, []).append(images)
        finally:
            pl_module.train(was_training)
        real = self._real(trainer, device)
        out: dict[str, float] = {}
        for name, chunks in sets.items():
            fake = extract(self.features, torch.cat(chunks), self.batch_size, device)
            if world > 1:  # every rank gets every rank's features, in seed order
                fake = {
                    k: pl_module.all_gather(v.to(device)).flatten(0, 1).cpu()
                    for k, v in fake.items()
                }
            fake = {k: v[: self.num_samples] for k, v in fake.items()}
            metrics = score(real, fake, self.name, kid_subset_size=self.kid_subset_size)
            out.update(
                {f"val/{k}_{name}": v for k, v in metrics.items() if not k.endswith("_std")}
            )
        self.seconds += time.perf_counter() - t0
        log.info(
            "step %d sample quality: %s",
            trainer.global_step,
            {k: round(v, 4) for k, v in out.items()},
        )
        return out

    @staticmethod
    def _publish(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log once at this step (``LightningModule.log`` from a callback would repeat the value
        on every later step's row) and expose the values to ModelCheckpoint(monitor=...)."""
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
    ) -> None:
        if self.disabled:
            return
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        ):
            self._last_step = step
            self._last = self.evaluate(trainer, pl_module)
            self._publish(trainer, self._last)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.disabled:
            return
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._last = self.evaluate(trainer, pl_module)
            self._publish(trainer, self._last)
        if trainer.is_global_zero and self._last:
            import json

            out = Path(trainer.default_root_dir or ".") / "sample_quality.json"
            out.write_text(
                json.dumps(
                    {
                        "step": trainer.global_step,
                        **self._last,
                        "num_samples": self.num_samples,
                        "num_real": self.num_real,
                        "real_split": self.real_split,
                        "seed": self.seed,
                        **describe(self.features),
                        "seconds_total": round(self.seconds, 2),
                    },
                    indent=2,
                )
            )
