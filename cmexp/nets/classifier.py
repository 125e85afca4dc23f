"""A small CNN classifier whose penultimate activations are the domain features for
Frechet distance / KID / precision-recall on small grey datasets (Fashion-MNIST), where
ImageNet Inception features say little (name the metric honestly: ``fd_fmnist``)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """``[B,C,H,W]`` in [-1,1] -> logits ``[B,num_classes]``; :meth:`features` gives the
    ``[B,feature_dim]`` penultimate activations. ~0.3M parameters at the defaults."""

    def __init__(self, img_channels: int = 1, img_resolution: int = 32, num_classes: int = 10,
                 width: int = 32, feature_dim: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        if min(img_channels, num_classes, width, feature_dim) < 1:
            raise ValueError("net.img_channels, num_classes, width and feature_dim must be >= 1")
        w = int(width)
        self.img_channels, self.img_resolution, self.num_classes = int(img_channels), int(img_resolution), int(num_classes)
        self.feature_dim = self.num_features = int(feature_dim)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(img_channels, w), block(w, 2 * w), block(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
