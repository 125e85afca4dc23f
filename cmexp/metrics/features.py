"""Feature extractors that plug into torchmetrics (``FrechetInceptionDistance(feature=...)``).

``ClassifierFeatures`` wraps a classifier trained by ``+experiment=fmnist_classifier``: its
penultimate activations replace Inception's on small grey datasets, and metrics computed with
it are named for it (``fd_fmnist``), not "FID".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class ClassifierFeatures(nn.Module):
    """Penultimate features ``[B, feature_dim]`` of a cmexp classifier checkpoint.

    Input: ``[B,C,H,W]`` floats in [0, 1] (torchmetrics' ``normalize=True`` convention) or
    uint8 in [0, 255]. ``name`` is the metric prefix (``fd_fmnist``).

    Args:
        ckpt: ``last.ckpt`` of ``python -m cmexp.train +experiment=fmnist_classifier``.
    """

    def __init__(self, ckpt: str, name: str = "fmnist") -> None:
        super().__init__()
        from hydra.utils import instantiate

        file = Path(str(ckpt)).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"features.ckpt={ckpt}: no such classifier checkpoint (train one with "
                "`python -m cmexp.train +experiment=fmnist_classifier`)"
            )
        state = torch.load(file, map_location="cpu", weights_only=True)
        meta = state.get("cmexp") if isinstance(state, dict) else None
        if not meta or meta.get("kind") != "classifier":
            raise ValueError(f"features.ckpt={ckpt} is not a classifier checkpoint written by cmexp.train")
        net = instantiate(meta["config"]["config"]["net"])
        net.load_state_dict({k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")})
        self.net = net.eval().requires_grad_(False)
        self.num_features = int(meta["feature_dim"])
        self.img_channels, self.img_resolution = int(meta["img_channels"]), int(meta["img_resolution"])
        self.name = name
        self.source = str(file)

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        super().train(False)  # always eval: BatchNorm statistics stay frozen
        return self

    def _prep(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.img_channels:
            if self.img_channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"the feature classifier expects {self.img_channels}-channel images, got {x.shape[1]}")
        if x.shape[-1] != self.img_resolution:
            x = torch.nn.functional.interpolate(x, size=(self.img_resolution,) * 2, mode="bilinear", antialias=True)
        return x * 2 - 1

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``[B, feature_dim]`` penultimate activations."""
        return self.net.features(self._prep(x))

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """``[B, num_classes]`` class logits (for the Inception-style score)."""
        return self.net(self._prep(x))


def frechet_distance_metric(features: nn.Module):
    """torchmetrics' Frechet distance over ``features`` (real statistics kept across
    ``reset()``); feed it images in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
