"""Classifier training for the domain feature extractor (``+experiment=fmnist_classifier``)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmexp.data.loader import mix
from cmexp.training.base import OptimizerFactory
from cmexp.training.clock import TrainingClock
from cmexp.utils.provenance import git_commit, machine

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")


def random_translate(
    images: Tensor, max_shift: int, generator: torch.Generator, fill: float = -1.0
) -> Tensor:
    """Shift each image of ``images`` ``[B,C,H,W]`` by its own random ``(dy, dx)`` in
    ``[-max_shift, max_shift]`` pixels; uncovered pixels get ``fill`` (the background -1).
    The offsets are drawn on the CPU from ``generator``. Returns ``[B,C,H,W]``."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    m = int(max_shift)
    padded = F.pad(images, (m, m, m, m), value=fill).permute(0, 2, 3, 1)  # [B, H+2m, W+2m, C]
    dy, dx = torch.randint(0, 2 * m + 1, (2, b), generator=generator).to(images.device)
    ar_h, ar_w = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    rows = (dy[:, None] + ar_h)[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + ar_w)[:, None, :]  # [B, 1, W]
    out = padded[torch.arange(b, device=images.device)[:, None, None], rows, cols]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last
        if images.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


class ClassifierLitModule(TrainingClock, pl.LightningModule):
    """Cross-entropy training of ``net`` (``cmexp.nets.SmallCNN``); at the end of training the
    test-split accuracy is logged as ``test/acc`` and written to ``<run>/classifier.json``.
    Checkpoints carry ``checkpoint["cmexp"]`` (kind "classifier") so feature extractors can
    be rebuilt from them alone.

    Args:
        net: the classifier, ``[B,C,H,W]`` in [-1,1] -> logits ``[B,num_classes]``.
        optimizer: partial optimizer, completed with the parameters.
        eval_batch_size: batch size of the final test-set evaluation.
        export_path: where the slim feature checkpoint goes at the end (never overwritten).
        lr_schedule: "constant", or "cosine": linear warm-up over ``warmup_steps`` then a
            cosine decay to ``min_lr_ratio`` x lr at ``trainer.max_steps``.
        translate: random translation of each training image by up to this many pixels
            (background -1 fills in; 0 = off). Drawn from ``(seed, step)``, so reproducible.
        label_smoothing: cross-entropy label smoothing.
        seed: seed of the translation offsets (``${seed}``).
    """

    kind = "classifier"

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        eval_batch_size: int = 500,
        export_path: str | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        translate: int = 0,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"model.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}"
            )
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"model.warmup_steps must be >= 0 and model.min_lr_ratio in [0, 1], got "
                f"{warmup_steps!r} and {min_lr_ratio!r}"
            )
        if translate < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(
                f"model.translate must be >= 0 pixels and model.label_smoothing in [0, 1), got "
                f"{translate!r} and {label_smoothing!r}"
            )
        self.export_path = export_path
        self.net = net
        self.optimizer_factory = optimizer
        self.eval_batch_size = int(eval_batch_size)
        self.lr_schedule, self.warmup_steps, self.min_lr_ratio = (
            lr_schedule,
            int(warmup_steps),
            float(min_lr_ratio),
        )
        self.translate, self.label_smoothing, self.seed = (
            int(translate),
            float(label_smoothing),
            int(seed),
        )
        self.run_config: dict[str, Any] | None = None
        self.images_seen = 0
        self.train_seconds = 0.0  # training wall time, summed over resumed runs (TrainingClock)
        self._git: dict[str, Any] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.translate:
            gen = torch.Generator().manual_seed(
                mix(self.seed, self.global_step, 3, self.global_rank)
            )
            images = random_translate(images, self.translate, gen)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.images_seen += images.shape[0] * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log(
            "train/acc",
            (logits.argmax(1) == labels).float().mean(),
            prog_bar=True,
            on_step=True,
            on_epoch=False,
        )
        return loss

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=self.net.parameters())
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return opt
        total = int(self.trainer.max_steps) if self.lr_schedule == "cosine" else 0
        if self.lr_schedule == "cosine" and total <= self.warmup_steps:
            raise ValueError(
                f"model.lr_schedule=cosine needs trainer.max_steps > model.warmup_steps="
                f"{self.warmup_steps}, got trainer.max_steps={self.trainer.max_steps}"
            )
        warm, floor = self.warmup_steps, self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if self.lr_schedule == "constant":
                return 1.0
            t = min((step - warm) / (total - warm), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Top-1 accuracy of ``images`` ``[N,C,H,W]`` in [-1,1] against ``labels`` ``[N]``."""
        was = self.net.training
        self.net.eval()
        correct = 0
        for i in range(0, len(images), self.eval_batch_size):
            x = images[i : i + self.eval_batch_size].to(self.device)
            correct += int(
                (self.net(x).argmax(1).cpu() == labels[i : i + self.eval_batch_size]).sum()
            )
        self.net.train(was)
        return correct / max(1, len(images))

    def on_train_start(self) -> None:
        self.start_clock()
        commit = git_commit()  # the code this run starts from (later edits do not count)
        self._git = (
            {"git_commit": commit["commit"], "git_dirty": commit["dirty"]}
            if commit["commit"]
            else {}
        )

    def on_train_end(self) -> None:
        self.stop_clock()
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            return
        test = dm.dataset("test")
        t0 = time.perf_counter()
        acc = self.accuracy(test.images.float() / 127.5 - 1, test.labels)
        eval_s = time.perf_counter() - t0
        for logger in self.trainer.loggers:
            logger.log_metrics({"test/acc": acc}, step=self.global_step)
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            info = {
                "test_acc": acc,
                "test_images": len(test),
                "steps": self.global_step,
                "images_seen": self.images_seen,
                "train_time_s": round(self.train_seconds, 1),
                "test_eval_s": round(eval_s, 1),
                "parameters": sum(p.numel() for p in self.net.parameters()),
                "seed": (self.run_config or {}).get("config", {}).get("seed"),
                **self._git,
                "machine": machine(),
            }
            out = Path(self.trainer.default_root_dir) / "classifier.json"
            out.write_text(json.dumps(info, indent=2))
            self.export(acc, info)

    def export(self, acc: float, info: dict[str, Any] | None = None) -> None:
        """Save the slim feature checkpoint to ``export_path`` (the Fashion-MNIST experiments'
        default feature extractor), never replacing an existing file. ``info`` (the
        ``classifier.json`` record) goes into ``checkpoint["cmexp"]["provenance"]``."""
        if not self.export_path:
            return
        dst = Path(self.export_path).expanduser()
        if dst.exists():
            log.warning("%s exists and is kept; this run's classifier is in its checkpoints/", dst)
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        ckpt: dict[str, Any] = {
            "state_dict": {f"net.{k}": v for k, v in self.net.state_dict().items()},
            "global_step": self.global_step,
        }
        self.on_save_checkpoint(ckpt)
        ckpt["cmexp"]["test_acc"] = acc
        if info is not None:
            ckpt["cmexp"]["provenance"] = info
        torch.save(ckpt, dst)
        log.info("exported the feature classifier (test accuracy %.4f) to %s", acc, dst)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cmexp"] = {
            "kind": self.kind,
            "img_resolution": int(self.net.img_resolution),
            "img_channels": int(self.net.img_channels),
            "num_classes": int(self.net.num_classes),
            "feature_dim": int(self.net.feature_dim),
            "config": self.run_config,
            "images_seen": int(self.images_seen),
            "train_time_s": float(self.elapsed()),  # the key of the shipped classifier's files
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cmexp") or {}
        self.images_seen = int(meta.get("images_seen", 0))
        self.train_seconds = float(meta.get("train_time_s", 0.0))
