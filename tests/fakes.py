"""Small fake weight files in the real formats, so loading code is tested without downloads."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch

# torchvision vgg16 `features` convolutions: index -> (in, out)
VGG16_CONVS = {
    0: (3, 64),
    2: (64, 64),
    5: (64, 128),
    7: (128, 128),
    10: (128, 256),
    12: (256, 256),
    14: (256, 256),
    17: (256, 512),
    19: (512, 512),
    21: (512, 512),
    24: (512, 512),
    26: (512, 512),
    28: (512, 512),
}


def fake_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 `features.*` state dict with random (He-scaled) values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = (
            torch.randn(cout, cin, 3, 3, generator=gen) * (2 / (9 * cin)) ** 0.5
        )
        state[f"features.{i}.bias"] = torch.randn(cout, generator=gen) * 0.01
    return state


def write_fake_vgg16(folder: Path, seed: int = 0) -> Path:
    """Write ``vgg16-397923af.pth`` (the torch hub cache name) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vgg16-397923af.pth"
    torch.save(fake_vgg16_state(seed), path)
    return path


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to its own process at the start of optimizer step ``step`` (a stand-in
    for a scheduler's preemption signal arriving in the middle of a step); with ``rank``, only
    on that global rank."""

    def __init__(self, step: int, signum: int = 15, rank: int | None = None) -> None:
        self.step, self.signum, self.sent, self.rank = int(step), int(signum), False, rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return  # only this rank is signalled (a scheduler reaching one process first)
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class _RoundSTE(torch.autograd.Function):
    """Straight-through rounding with a backward but no forward-mode derivative (no ``jvp``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.round(x * 64) / 64 - x).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Quantize(torch.nn.Module):
    """A layer that does not support forward-mode AD (torch.func.jvp fails inside it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RoundSTE.apply(x)


class NoForwardADTinyUNet(torch.nn.Module):
    """``cmexp.nets.TinyUNet`` followed by :class:`Quantize`: the raw-net contract, but a layer
    without forward-mode AD (``net._target_=tests.fakes.NoForwardADTinyUNet`` in the bad-input
    corpus; same constructor arguments as TinyUNet)."""

    def __init__(self, **kwargs) -> None:
        from cmexp.nets import TinyUNet

        super().__init__()
        self.body = TinyUNet(**kwargs)
        self.quant = Quantize()
        self.img_resolution, self.img_channels = self.body.img_resolution, self.body.img_channels
        self.label_dim = self.body.label_dim
        self.guidance_embed = self.body.guidance_embed  # a second input (MeanFlow's t - r)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels=None, guidance=None
    ) -> torch.Tensor:
        extra = {} if guidance is None else {"guidance": guidance}
        return self.quant(self.body(x, noise_labels, class_labels, **extra))
