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
        ckpt: ``last.ckpt`` (or the export) of ``python -m cmexp.train +experiment=fmnist_classifier``,
            or a ``zoo:NAME``.
    """

    def __init__(self, ckpt: str, name: str = "fmnist") -> None:
        super().__init__()
        from hydra.utils import instantiate

        from cmexp.inference.checkpoint import read_checkpoint

        try:
            ckpt = read_checkpoint(ckpt, key="features.ckpt", kinds=("classifier",))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} (train one with `python -m cmexp.train +experiment=fmnist_classifier`)"
            ) from None
        meta = ckpt.meta
        net = instantiate(ckpt.net_config())
        try:
            net.load_state_dict(ckpt.weights("net."))
        except RuntimeError as err:
            raise ValueError(
                f"features.ckpt={ckpt.source}: its weights do not fit its recorded net config "
                f"({str(err).splitlines()[0]})"
            ) from None
        self.net = net.eval().requires_grad_(False)
        self.num_features = int(meta["feature_dim"])
        self.img_channels, self.img_resolution = (
            int(meta["img_channels"]),
            int(meta["img_resolution"]),
        )
        self.name = name
        self.source = str(ckpt.path)

    #: Fashion-MNIST's own side and the suite's padded one (28 + 2 x 2): the sizes the
    #: classifier's features mean something for (its input is resized to its own side).
    RESOLUTIONS = (28, 32)

    def accepts(self, channels: int, resolution: int) -> bool:
        """Whether images of ``channels`` x ``resolution``^2 are what the classifier scores
        (its own channel count; 28 or 32 pixels, or its own side)."""
        return int(channels) == self.img_channels and int(resolution) in (
            *self.RESOLUTIONS,
            self.img_resolution,
        )

    def describe_input(self) -> str:
        sides = " or ".join(str(r) for r in sorted({*self.RESOLUTIONS, self.img_resolution}))
        return f"{self.img_channels}-channel Fashion-MNIST-like images ({sides} pixels)"

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        super().train(False)  # always eval: BatchNorm statistics stay frozen
        return self

    def _prep(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.img_channels:
            if self.img_channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(
                    f"the feature classifier expects {self.img_channels}-channel images, got {x.shape[1]}"
                )
        if x.shape[-1] != self.img_resolution:
            x = torch.nn.functional.interpolate(
                x, size=(self.img_resolution,) * 2, mode="bilinear", antialias=True
            )
        return x * 2 - 1

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``[B, feature_dim]`` penultimate activations."""
        return self.net.features(self._prep(x))

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """``[B, num_classes]`` class logits (for the Inception-style score)."""
        return self.net(self._prep(x))


class InceptionFeatures(nn.Module):
    """The standard FID/IS network: torch-fidelity's Inception-v3 port of the TF graph
    (2048-d pool features, unbiased logits for IS). Metric names are the usual ``fid``,
    ``kid``, ``is`` (``name=""``).

    Weights: ``weights_path`` (the file or a folder holding it), else the torch hub cache
    ``$TORCH_HOME/hub/checkpoints/``; downloaded only when github.com answers within 2 s.
    Offline without the file it fails at once naming the file and both places.
    Input: ``[B,C,H,W]`` floats in [0, 1] (grey images are repeated to RGB).
    """

    FILE = "weights-inception-2015-12-05-6726825d.pth"
    URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FILE
    # its SHA-256 and where that comes from: cmexp.metrics.pins.PINNED[FILE]

    def __init__(self, weights_path: str | None = None, name: str = "") -> None:
        super().__init__()
        import os

        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from cmexp.utils.network import online

        cache = Path(torch.hub.get_dir()) / "checkpoints"
        if weights_path:
            p = Path(str(weights_path)).expanduser()
            path = p / self.FILE if p.is_dir() else p
            if not path.is_file():
                raise FileNotFoundError(
                    f"features.weights_path={weights_path}: no such file (expected {self.FILE})"
                )
        else:
            path = cache / self.FILE
            if not path.is_file():
                if os.environ.get("CMEXP_OFFLINE") == "1" or not online(self.URL):
                    raise FileNotFoundError(
                        f"Inception-v3 (FID/IS) needs the weights file {self.FILE}, which cannot be downloaded "
                        f"here (no network): copy it (from {self.URL}) into {cache}/ or set "
                        f"features.weights_path=/path/to/{self.FILE}"
                    )
                from cmexp.metrics.pins import download

                download(self.FILE, cache, "features.weights_path")  # SHA-256 checked first
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )
        self.num_features = 2048
        self.name, self.source = name, str(path)
        from cmexp.metrics.pins import check_file

        #: the weights' SHA-256 and whether it is the pinned one ("code"); another file (e.g. a
        #: re-export) is used, with "mismatch" in the protocol and a warning: not the paper's FID
        self.pin = check_file(path, "features.weights_path", strict=False)
        if self.pin["pin"] != "code":
            import logging

            logging.getLogger(__name__).warning(
                "%s is not the pinned torch-fidelity Inception file (SHA-256 %s...): FID/IS from it "
                "are not the papers' protocol",
                path,
                self.pin["sha256"][:16],
            )

    def train(self, mode: bool = True) -> "InceptionFeatures":
        super().train(False)
        return self

    def _both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u8 = (x.float().clamp(0, 1) * 255).round().to(torch.uint8) if x.dtype != torch.uint8 else x
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        feats, logits = self.net(u8)
        return feats, logits

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``[B, 2048]`` pool features."""
        return self._both(x)[0]

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """``[B, 1008]`` unbiased logits (IS)."""
        return self._both(x)[1]


def check_feature_input(
    features: nn.Module, channels: int, resolution: int, what: str, choice: str = ""
) -> None:
    """A ValueError naming ``features=`` when the extractor does not score ``what`` (images of
    ``channels`` x ``resolution``^2): the Fashion-MNIST classifier's features of RGB or
    other-sized images would give a number (``fd_fmnist``) that means nothing. Extractors
    without an ``accepts`` method (Inception: any image) pass."""
    accepts = getattr(features, "accepts", None)
    if accepts is None or accepts(channels, resolution):
        return
    name = choice or "fmnist_classifier"
    raise ValueError(
        f"features={name} scores {features.describe_input()}; {what} are "
        f"{int(channels)}x{int(resolution)}x{int(resolution)}: use features=inception "
        "(or a feature classifier of that data)"
    )


def check_features_fit(features: nn.Module, channels: int, resolution: int, what: str) -> None:
    """:func:`check_feature_input` for an entry point's ``features=`` choice (named in the
    error as the user typed it)."""
    from hydra.core.hydra_config import HydraConfig

    choice = ""
    if HydraConfig.initialized():
        choice = str(HydraConfig.get().runtime.choices.get("features") or "")
    check_feature_input(features, int(channels), int(resolution), what, choice)
