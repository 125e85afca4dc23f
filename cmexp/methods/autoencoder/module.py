"""The first stage of latent mode (``+experiment=fmnist_autoencoder``): a KL-regularised
autoencoder (Rombach et al. 2022, LDM) whose checkpoint records the latent scale factor.

Every checkpoint carries ``checkpoint["cmexp"]`` with kind "autoencoder", the latent shape, the
scale factor ``1 / std`` of the training set's latents (LDM's ``scale_by_std``, measured on the
posterior means of the first ``model.scale_images`` training images for the weights of that
checkpoint) and the reconstruction PSNR on the first ``model.psnr_images`` test images.
Latent runs (``latent=autoencoder latent.autoencoder_path=...``) read both from it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from cmexp.data.loader import mix
from cmexp.losses.distances import L2Distance
from cmexp.nets.autoencoder import ConvAutoencoder, gaussian_kl
from cmexp.training.base import OptimizerFactory
from cmexp.training.clock import TrainingClock

log = logging.getLogger(__name__)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB of images in [-1, 1] (data range 2; ``x`` clamped): ``[B]``."""
    mse = (x.clamp(-1, 1) - y).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class AutoencoderLitModule(TrainingClock, pl.LightningModule):
    """Trains ``net`` with reconstruction + ``kl_weight`` x KL per image (LDM's
    ``LPIPSWithDiscriminator`` without its perceptual and GAN terms).

    The loss per image is ``d(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / (C H W)``: LDM's
    pixel-summed reconstruction plus ``kl_weight`` x the latent-summed KL, divided by the
    pixel count (the same optimum). z is drawn from the posterior with noise seeded by
    ``(seed, step)``, so a resumed run draws what the uninterrupted one would.

    Args:
        net: :class:`cmexp.nets.ConvAutoencoder`.
        optimizer: partial optimizer (Adam), completed with the parameters.
        reconstruction: the distance d(x, y) -> ``[B]`` (``cmexp.losses.L2Distance``: the
            squared error PSNR measures; LDM uses l1 + LPIPS).
        kl_weight: LDM's KL-f models use 1e-6.
        scale_images: training images whose latent std gives the scale factor.
        psnr_images: test images of the reported reconstruction PSNR.
        eval_batch_size: batch size of those two passes.
        seed: seed of the posterior noise (``${seed}``).
    """

    kind = "autoencoder"

    def __init__(
        self,
        net: ConvAutoencoder,
        optimizer: OptimizerFactory,
        reconstruction: Any = None,
        kl_weight: float = 1e-6,
        scale_images: int = 10000,
        psnr_images: int = 10000,
        eval_batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not kl_weight >= 0:
            raise ValueError(f"model.kl_weight must be >= 0, got {kl_weight!r}")
        if scale_images < 2 or psnr_images < 1 or eval_batch_size < 1:
            raise ValueError(
                "model.scale_images must be >= 2, model.psnr_images and model.eval_batch_size >= 1, got "
                f"{scale_images!r}, {psnr_images!r}, {eval_batch_size!r}"
            )
        self.net = net
        self.optimizer_factory = optimizer
        self.reconstruction = reconstruction if reconstruction is not None else L2Distance()
        self.kl_weight = float(kl_weight)
        self.scale_images, self.psnr_images = int(scale_images), int(psnr_images)
        self.eval_batch_size, self.seed = int(eval_batch_size), int(seed)
        self.run_config: dict[str, Any] | None = None
        self.images_seen = 0
        self.batches_seen = 0  # the data loader's resume point
        self.train_seconds = 0.0
        self._stats: tuple[int, dict[str, float]] | None = None  # (global_step, statistics)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        gen = torch.Generator().manual_seed(mix(self.seed, self.global_step, 4, self.global_rank))
        shape = (
            x.shape[0],
            self.net.latent_channels,
            self.net.latent_resolution,
            self.net.latent_resolution,
        )
        noise = torch.randn(shape, generator=gen).to(x)
        recon, mean, logvar = self.net(x, noise)
        rec = self.reconstruction(recon, x)
        kl = gaussian_kl(mean, logvar)
        loss = (rec + self.kl_weight * kl / x[0].numel()).mean()
        self.images_seen += x.shape[0] * self.trainer.world_size
        self.batches_seen += 1
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/rec", rec.mean(), on_step=True, on_epoch=False)
        self.log("train/kl", kl.mean(), on_step=True, on_epoch=False)
        self.log(
            "train/psnr",
            psnr(recon.detach(), x).mean(),
            prog_bar=True,
            on_step=True,
            on_epoch=False,
        )
        return loss

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(params=self.net.parameters())

    # ---------------------------------------------------------------- statistics
    @torch.no_grad()
    def statistics(self, train: Tensor, test: Tensor) -> dict[str, float]:
        """Scale factor and PSNR of the current weights.

        Args:
            train: ``[N, C, H, W]`` training images in [-1, 1] (the latent statistics).
            test: ``[M, C, H, W]`` test images in [-1, 1] (reconstruction PSNR from the
                posterior means, as latent mode decodes).

        Returns:
            ``scale_factor`` (1 / std of all latent elements, LDM), ``latent_mean``,
            ``latent_std``, ``psnr`` (dB, mean over images) and the image counts.
        """
        was = self.net.training
        self.net.eval()
        dev, bs = self.device, self.eval_batch_size
        means = torch.cat(
            [self.net.encode(train[i : i + bs].to(dev))[0].cpu() for i in range(0, len(train), bs)]
        )
        values = []
        for i in range(0, len(test), bs):
            x = test[i : i + bs].to(dev)
            values.append(psnr(self.net.decode(self.net.encode(x)[0]), x).cpu())
        self.net.train(was)
        std = float(means.double().std())
        if not std > 0:
            raise ValueError(
                "the autoencoder's latents have zero variance; train it longer or lower model.kl_weight"
            )
        return {
            "scale_factor": 1.0 / std,
            "latent_mean": float(means.double().mean()),
            "latent_std": std,
            "psnr": float(torch.cat(values).mean()),
            "scale_images": len(train),
            "psnr_images": len(test),
        }

    def current_statistics(self) -> dict[str, float]:
        """:meth:`statistics` on the trainer's data (first ``scale_images`` training and
        ``psnr_images`` test images), computed once per optimizer step."""
        if self._stats is not None and self._stats[0] == self.global_step:
            return self._stats[1]
        dm = self.trainer.datamodule
        stats = self.statistics(
            dm.real_images(self.scale_images, "train"), dm.real_images(self.psnr_images, "test")
        )
        self._stats = (self.global_step, stats)
        return stats

    # ---------------------------------------------------------------- checkpoints
    def metadata(self) -> dict[str, Any]:
        n = self.net
        return {
            "kind": self.kind,
            "img_resolution": int(n.img_resolution),
            "img_channels": int(n.img_channels),
            "latent_resolution": int(n.latent_resolution),
            "latent_channels": int(n.latent_channels),
            "kl_weight": self.kl_weight,
        }

    def on_train_start(self) -> None:
        self.start_clock()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cmexp"] = {
            **self.metadata(),
            **self.current_statistics(),
            "images_seen": self.images_seen,
            "batches_seen": self.batches_seen,
            "train_seconds": round(self.elapsed(), 3),
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("cmexp") or {}
        if meta.get("kind") != self.kind:
            raise ValueError(
                f"ckpt_path holds a '{meta.get('kind')}' model but this run trains '{self.kind}'; "
                "resume with the same +experiment"
            )
        self.images_seen = int(meta.get("images_seen", 0))
        self.batches_seen = int(meta.get("batches_seen", 0))
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if dm is not None and hasattr(dm, "start_batch"):
            dm.start_batch = self.batches_seen

    def on_train_end(self) -> None:
        """Log ``test/psnr`` and the scale factor; write ``<run>/autoencoder.json`` and a
        reconstruction grid (``reconstructions.png``: originals over reconstructions)."""
        self.stop_clock()
        if self.trainer.datamodule is None:
            return
        t0 = time.perf_counter()
        stats = self.current_statistics()
        for logger in self.trainer.loggers:
            logger.log_metrics(
                {"test/psnr": stats["psnr"], "latent/scale_factor": stats["scale_factor"]},
                step=self.global_step,
            )
        if not (self.trainer.is_global_zero and self.trainer.default_root_dir):
            return
        from cmexp.utils.images import image_grid, save_png

        root = Path(self.trainer.default_root_dir)
        x = self.trainer.datamodule.real_images(16, "test").to(self.device)
        with torch.no_grad():
            was = self.net.training
            self.net.eval()
            recon = self.net.decode(self.net.encode(x)[0]).clamp(-1, 1)
            self.net.train(was)
        save_png(
            image_grid(torch.cat([x, recon]).cpu(), nrow=16), root / "reconstructions.png", scale=2
        )
        info = {
            **self.metadata(),
            **stats,
            "steps": self.global_step,
            "images_seen": self.images_seen,
            "train_time_s": round(self.train_seconds, 1),
            "statistics_s": round(time.perf_counter() - t0, 1),
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }
        (root / "autoencoder.json").write_text(json.dumps(info, indent=2))
        log.info(
            "autoencoder: test PSNR %.2f dB, scale factor %.4f",
            stats["psnr"],
            stats["scale_factor"],
        )
