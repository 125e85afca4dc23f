"""Distance metrics d(x, y) of the consistency objectives (CM paper Eq. 7 and Sec. 5).

Inputs are images ``[B, C, H, W]`` in [-1, 1]; every metric returns per-sample values ``[B]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cmexp.utils.network import online

#: A distance d(x, y) -> ``[B]`` over images ``[B, C, H, W]``.
Metric = Callable[[Tensor, Tensor], Tensor]

# torchvision's ImageNet backbones used by LPIPS: (file name in the torch hub cache, URL).
BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": (
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    ),
    "squeeze": (
        "squeezenet1_1-b8a52dc0.pth",
        "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    ),
}


def l2(x: Tensor, y: Tensor) -> Tensor:
    """Squared l2, averaged over C, H, W (CM paper: d(x, y) = ||x - y||_2^2). ``[B]``."""
    return (x - y).square().flatten(1).mean(1)


def l1(x: Tensor, y: Tensor) -> Tensor:
    """l1, averaged over C, H, W (CM paper Fig. 3a). ``[B]``."""
    return (x - y).abs().flatten(1).mean(1)


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """iCT's pseudo-Huber metric (Song & Dhariwal 2023, Sec. 3.3):
    ``sqrt(||x - y||_2^2 + c^2) - c`` with the sum-of-squares norm over C, H, W and the default
    ``c = 0.00054 sqrt(d)``, d = C H W (c = 0.03 on CIFAR-10's 3072 dimensions). ``[B]``."""
    if c is None:
        c = 0.00054 * math.sqrt(x[0].numel())
    return ((x - y).square().flatten(1).sum(1) + c * c).sqrt() - c


class L2Distance:
    """Callable form of :func:`l2` for configs (``metric=l2``)."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return l2(x, y)


class L1Distance:
    """Callable form of :func:`l1` for configs (``metric=l1``)."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return l1(x, y)


class L2NormDistance:
    """The l2 norm ``||x - y||_2`` over C, H, W (not squared): ECT's metric with ``c = 0``
    (Geng et al. 2025; the limit c -> 0 of pseudo-Huber). ``[B]``."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return (x - y).flatten(1).norm(dim=1)


class PseudoHuberDistance:
    """Callable form of :func:`pseudo_huber`; ``c=None`` uses 0.00054 sqrt(d)."""

    def __init__(self, c: float | None = None) -> None:
        if c is not None and c <= 0:
            raise ValueError(f"metric.c must be > 0 or null, got {c}")
        self.c = c

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return pseudo_huber(x, y, self.c)


def backbone_weights(net: str, weights_path: str | None = None) -> dict[str, Tensor]:
    """The torchvision state dict of the LPIPS backbone ``net``.

    Looked up in ``weights_path`` (a file, or a folder holding the file), then in the torch hub
    cache ``$TORCH_HOME/hub/checkpoints/``; downloaded there only when the host answers within
    2 s. Offline without the file it raises ``FileNotFoundError`` at once, naming the file, the
    folder and ``metric.weights_path``.
    """
    if net not in BACKBONES:
        raise ValueError(f"metric.net must be one of {sorted(BACKBONES)}, got {net!r}")
    name, url = BACKBONES[net]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = []
    if weights_path:
        p = Path(str(weights_path)).expanduser()
        candidates.append(p / name if p.is_dir() else p)
    candidates.append(cache / name)
    for p in candidates:
        if p.is_file():
            return torch.load(p, map_location="cpu", weights_only=True)
    if weights_path:
        raise FileNotFoundError(
            f"metric.weights_path={weights_path}: no such file (expected {name})"
        )
    if os.environ.get("CMEXP_OFFLINE") != "1" and online(url):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    raise FileNotFoundError(
        f"LPIPS needs the ImageNet {net} backbone weights {name}, which cannot be downloaded "
        f"here (no network): copy {name} (from {url}) into {cache}/ or set "
        f"metric.weights_path=/path/to/{name}"
    )


class LPIPSDistance:
    """LPIPS (Zhang et al. 2018) as the CM paper uses it (Sec. 5, App. C): both images are
    upsampled bilinearly to 224x224 before a frozen ImageNet backbone (VGG16 by default) with
    the learned linear heads of the ``lpips`` package (v0.1). Returns ``[B]``.

    Inputs in [-1, 1] are passed to ``lpips.LPIPS`` as they are (its own convention; the CM
    code's "[-1, 1] -> [0, 1]" followed by lpips' ``normalize=True`` maps them back to the same
    values). Grey images are repeated to RGB. Gradients flow to the inputs only.

    The module is not an ``nn.Module`` attribute of the training module, so its ~15M frozen
    backbone parameters never enter checkpoints; it follows the inputs' device lazily.

    Args:
        net: backbone, ``"vgg"`` (CM paper), ``"alex"`` or ``"squeeze"``.
        weights_path: torchvision backbone file or a folder holding it (``metric.weights_path``);
            default: the torch hub cache.
        resize: side length images are upsampled to; 224 in the paper, None keeps the input size.
    """

    def __init__(
        self, net: str = "vgg", weights_path: str | None = None, resize: int | None = 224
    ) -> None:
        if resize is not None and resize < 16:
            raise ValueError(f"metric.resize must be null or >= 16, got {resize}")
        state = backbone_weights(net, weights_path)
        import lpips

        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        features = {
            k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")
        }
        own = model.net.state_dict()
        mapped = {}
        for key in own:
            _, idx, param = key.split(".")  # sliceK.<torchvision index>.<weight|bias>
            src = f"{idx}.{param}"
            if src not in features:
                raise ValueError(f"backbone weights for LPIPS({net}) lack features.{src}")
            mapped[key] = features[src]
        model.net.load_state_dict(mapped)
        model.requires_grad_(False).eval()
        self.model, self.resize, self.net = model, resize, net

    def _prep(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(
                x, size=(self.resize, self.resize), mode="bilinear", align_corners=False
            )
        return x

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        first = next(self.model.parameters())
        if first.device != x.device:
            self.model.to(x.device)
        out = self.model(self._prep(x.float()), self._prep(y.float()))
        return out.flatten().to(x.dtype)
