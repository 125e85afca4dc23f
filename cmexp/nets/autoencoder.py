"""A small KL-regularised convolutional autoencoder for latent mode (Rombach et al. 2022, LDM,
"KL-f" first stage, scaled down): images ``[B, C, H, W]`` in [-1, 1] <-> latents
``[B, z, H / f, W / f]`` with ``f = 2 ** (len(channel_mult) - 1)``.

The encoder outputs the mean and log-variance of a diagonal Gaussian posterior q(z | x); the
KL term against N(0, I) keeps the latent space smooth (LDM's ``kl_weight`` 1e-6). No
attention, no GAN or perceptual loss: Fashion-MNIST at 32x32 does not need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups that divide ``channels`` (LDM uses 32 at 128+ channels)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1 when the width changes) skip: ``[B,c_in,H,W] -> [B,c_out,H,W]``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvAutoencoder(nn.Module):
    """Encoder/decoder pair with a diagonal-Gaussian bottleneck.

    Args:
        img_resolution: image side H = W (32 for Fashion-MNIST padded).
        img_channels: image channels C (1 grey, 3 RGB).
        latent_channels: z, the latent channels (4 as LDM's KL-f4/f8 models).
        model_channels: width of the first level.
        channel_mult: width multipliers per level; each level after the first halves the side
            (``[1, 2, 2]``: 32x32 -> 16x16 -> 8x8, f = 4).
        num_blocks: residual blocks per level.

    Shapes:
        ``encode``: ``[B, C, H, W] -> (mean, logvar)``, each ``[B, z, H/f, W/f]``;
        ``decode``: ``[B, z, H/f, W/f] -> [B, C, H, W]``.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        img_channels: int = 1,
        latent_channels: int = 4,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 1,
    ) -> None:
        super().__init__()
        mult = [int(m) for m in channel_mult]
        if not mult:
            raise ValueError("net.channel_mult must hold at least one level")
        factor = 2 ** (len(mult) - 1)
        if img_resolution % factor:
            raise ValueError(
                f"net.img_resolution={img_resolution} must be divisible by {factor} for net.channel_mult={mult}"
            )
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.latent_channels, self.factor = int(latent_channels), factor
        self.latent_resolution = self.img_resolution // factor
        widths = [int(model_channels) * m for m in mult]

        enc: list[nn.Module] = [nn.Conv2d(img_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(num_blocks):
                enc.append(ResBlock(c, w))
                c = w
            if level < len(widths) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [
            ResBlock(c, c),
            _norm(c),
            nn.SiLU(),
            nn.Conv2d(c, 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), ResBlock(c, c)]
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_blocks):
                dec.append(ResBlock(c, w))
                c = w
            if level > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, img_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20] as LDM), ``[B, z, h, w]`` each."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction ``[B, C, H, W]`` (not clamped) from latents ``[B, z, h, w]``."""
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, mean, logvar)`` with z = mean + exp(logvar / 2) * noise drawn from
        the posterior (``noise``: standard normal ``[B, z, h, w]``; drawn here when None)."""
        mean, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        return self.decode(mean + (0.5 * logvar).exp() * noise), mean, logvar


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent elements: ``[B]``.

    ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class LatentCodec(nn.Module):
    """Frozen encoder/decoder between images and scaled latents.

    Args:
        autoencoder: a trained :class:`cmexp.nets.ConvAutoencoder`.
        scale: LDM's scale factor, 1 / std of the training set's latents.
        source: the autoencoder checkpoint it was read from (recorded, not re-read).
        sha256: that file's SHA-256.
        net_config: the autoencoder's net config (rebuilds it from a latent model's checkpoint).

    Shapes:
        ``encode``: images ``[B, C, H, W]`` in [-1, 1] -> latents ``[B, z, h, w]``;
        ``decode``: latents -> images ``[B, C, H, W]`` (not clamped).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scale: float,
        source: str = "",
        sha256: str = "",
        net_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"the latent scale factor must be > 0, got {scale!r}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.source, self.sha256 = str(source), str(sha256)
        self.net_config = dict(net_config or {})

    # the frozen autoencoder stays in eval mode whatever its owner does
    def train(self, mode: bool = True) -> LatentCodec:
        super().train(False)
        return self

    @property
    def resolution(self) -> int:
        """Latent side h = w."""
        return int(self.autoencoder.latent_resolution)

    @property
    def channels(self) -> int:
        """Latent channels z."""
        return int(self.autoencoder.latent_channels)

    @property
    def img_resolution(self) -> int:
        return int(self.autoencoder.img_resolution)

    @property
    def img_channels(self) -> int:
        return int(self.autoencoder.img_channels)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Scaled posterior means ``scale * mean(q(z | x))``: ``[B, z, h, w]``."""
        return self.autoencoder.encode(images)[0] * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``D(latents / scale)``: ``[B, C, H, W]``."""
        return self.autoencoder.decode(latents / self.scale)

    def describe(self) -> dict[str, Any]:
        """``checkpoint["cmexp"]["latent"]`` of a latent model."""
        return {
            "autoencoder_path": self.source,
            "autoencoder_sha256": self.sha256,
            "scale": float(self.scale),
            "resolution": self.resolution,
            "channels": self.channels,
            "img_resolution": self.img_resolution,
            "img_channels": self.img_channels,
            "net": self.net_config,
        }
