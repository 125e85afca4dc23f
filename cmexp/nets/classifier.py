"""A small CNN classifier whose penultimate activations are the domain features for
Frechet distance / KID / precision-recall on small grey datasets (Fashion-MNIST), where
ImageNet Inception features say little (name the metric honestly: ``fd_fmnist``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """``[B,C,H,W]`` in [-1,1] -> logits ``[B,num_classes]``; :meth:`features` gives the
    ``[B,feature_dim]`` penultimate activations. ~0.3M parameters at the defaults.

    Stage ``i`` has ``convs[i]`` 3x3 conv-BN-ReLU layers of ``width * 2**i`` channels and ends
    in a 2x2 max-pool; then global average pooling and a ``feature_dim`` linear+ReLU layer
    (the features), dropout and the linear class head.

    Args:
        convs: conv layers per stage (default ``(2, 2, 2)``: the original three double-conv
            blocks; ``(1, 2, 2)`` spends less at full resolution).
        channels_last: keep weights and activations in NHWC memory format (same numbers up to
            rounding; about 1.4x faster training and 2x faster inference on x86 CPUs).
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 32,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.2,
        convs: Sequence[int] = (2, 2, 2),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if min(img_channels, num_classes, width, feature_dim) < 1:
            raise ValueError("net.img_channels, num_classes, width and feature_dim must be >= 1")
        convs = [int(n) for n in convs]
        if not convs or min(convs) < 1:
            raise ValueError(
                f"net.convs must be a non-empty list of conv counts >= 1 per stage, got {convs}"
            )
        w = int(width)
        self.img_channels, self.img_resolution, self.num_classes = (
            int(img_channels),
            int(img_resolution),
            int(num_classes),
        )
        self.feature_dim = self.num_features = int(feature_dim)
        self.channels_last = bool(channels_last)

        def block(cin: int, cout: int, n: int) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(n):
                layers += [
                    nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        widths = [w * 2**i for i in range(len(convs))]
        stages = [
            block(cin, cout, n)
            for cin, cout, n in zip([img_channels, *widths[:-1]], widths, convs)
        ]
        self.body = nn.Sequential(
            *stages,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]`` of ``x`` ``[B,C,H,W]`` in [-1,1]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))
