"""Classifier training for the domain feature extractor (``+experiment=fmnist_classifier``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmexp.modules.base import OptimizerFactory


class ClassifierLitModule(pl.LightningModule):
    """Cross-entropy training of ``net`` (``cmexp.nets.SmallCNN``); at the end of training the
    test-split accuracy is logged as ``test/acc`` and written to ``<run>/classifier.json``.
    Checkpoints carry ``checkpoint["cmexp"]`` (kind "classifier") so feature extractors can
    be rebuilt from them alone."""

    kind = "classifier"

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, eval_batch_size: int = 500,
                 export_path: str | None = None) -> None:
        super().__init__()
        self.export_path = export_path
        self.net = net
        self.optimizer_factory = optimizer
        self.eval_batch_size = int(eval_batch_size)
        self.run_config: dict[str, Any] | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.net.parameters())

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Top-1 accuracy of ``images`` ``[N,C,H,W]`` in [-1,1] against ``labels`` ``[N]``."""
        was = self.net.training
        self.net.eval()
        correct = 0
        for i in range(0, len(images), self.eval_batch_size):
            x = images[i : i + self.eval_batch_size].to(self.device)
            correct += int((self.net(x).argmax(1).cpu() == labels[i : i + self.eval_batch_size]).sum())
        self.net.train(was)
        return correct / max(1, len(images))

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            return
        test = dm.dataset("test")
        acc = self.accuracy(test.images.float() / 127.5 - 1, test.labels)
        for logger in self.trainer.loggers:
            logger.log_metrics({"test/acc": acc}, step=self.global_step)
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            out = Path(self.trainer.default_root_dir) / "classifier.json"
            out.write_text(json.dumps({"test_acc": acc, "test_images": len(test), "steps": self.global_step}, indent=2))
            self.export(acc)

    def export(self, acc: float) -> None:
        """Save the slim feature checkpoint to ``export_path`` (the Fashion-MNIST experiments'
        default feature extractor), never replacing an existing file."""
        if not self.export_path:
            return
        import logging

        dst = Path(self.export_path).expanduser()
        if dst.exists():
            logging.getLogger(__name__).warning("%s exists and is kept; this run's classifier is in its checkpoints/", dst)
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        ckpt: dict[str, Any] = {"state_dict": {f"net.{k}": v for k, v in self.net.state_dict().items()},
                                "global_step": self.global_step}
        self.on_save_checkpoint(ckpt)
        ckpt["cmexp"]["test_acc"] = acc
        torch.save(ckpt, dst)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cmexp"] = {
            "kind": self.kind, "img_resolution": int(self.net.img_resolution),
            "img_channels": int(self.net.img_channels), "num_classes": int(self.net.num_classes),
            "feature_dim": int(self.net.feature_dim), "config": self.run_config,
        }
