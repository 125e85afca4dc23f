"""A very small two-resolution residual UNet for unit/integration tests (~30k parameters).

Same contract as :class:`cmexp.nets.SongUNet`: ``net(x [B,C,H,W], noise_labels [B],
class_labels [B] | None) -> [B,C,H,W]``, attributes ``img_resolution``, ``img_channels``,
``label_dim``; supports class labels (row ``label_dim`` = null label) and dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmexp.nets.guidance import GuidanceEmbedding, guidance_term
from cmexp.nets.layers import (
    GaussianFourierEmbedding,
    PositionalEmbedding,
    ResBlock,
    conv2d,
    fir_downsample,
    fir_kernel_2d,
    fir_upsample,
    group_norm,
    linear,
)
from cmexp.nets.unet import prepare_labels, prepare_noise_labels


class TinyUNet(nn.Module):
    """Two-level residual UNet: ``conv_in -> ResBlock(c) -> avg-pool -> ResBlock(c->2c) ->
    nearest-up -> ResBlock(3c->c) (with skip) -> GroupNorm/SiLU -> conv_out``.

    Parameters: 29,137 for 1 channel and 29,587 for 3 channels (model_channels 16,
    label_dim 0). A forward at batch 8, 32x32 takes a few ms on CPU.
    """

    def __init__(
        self,
        img_resolution: int,  # Image height = width; must be even.
        img_channels: int,  # Input = output channels.
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        model_channels: int = 16,  # Width at full resolution (2x at half resolution).
        dropout: float = 0.0,  # Dropout inside the residual blocks.
        embedding_type: str = "fourier",  # "fourier" (for ln(sigma)/4 labels) or "positional".
        fourier_scale: float = 1.0,  # Std of Fourier frequencies; 1 suits labels of O(1).
        init_scale: float = 1.0,  # Init scale of last convs (0 = near-zero as SongUNet).
        guidance_embed: bool = False,  # Guidance-scale input w (guided CD students; zero-init).
    ) -> None:
        super().__init__()
        if img_resolution % 2:
            raise ValueError(f"img_resolution must be even, got {img_resolution}")
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(
                f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}"
            )
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim = int(label_dim)
        c, emb = model_channels, 2 * model_channels
        if embedding_type == "fourier":
            self.noise_embed: nn.Module = GaussianFourierEmbedding(emb, fourier_scale)
        else:
            self.noise_embed = PositionalEmbedding(emb)
        self.label_embed = nn.Embedding(label_dim + 1, emb) if label_dim > 0 else None
        self.guidance_embed = GuidanceEmbedding(emb) if guidance_embed else None
        self.map0 = linear(emb, emb)
        self.map1 = linear(emb, emb)
        block = dict(emb_channels=emb, dropout=dropout, init_scale=init_scale)
        self.conv_in = conv2d(img_channels, c, 3)
        self.enc0 = ResBlock(c, c, **block)
        self.enc1 = ResBlock(c, 2 * c, **block)
        self.dec0 = ResBlock(3 * c, c, **block)
        self.norm_out = group_norm(c)
        self.conv_out = conv2d(c, img_channels, 3, init_scale)
        self.register_buffer("box", fir_kernel_2d((1, 1)), persistent=False)

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """Args: x ``[B, C, H, W]``; noise_labels float ``[B]``; class_labels None or int64
        ``[B]`` in ``[0, label_dim]``; guidance None or w (scalar or ``[B]``, guided students).
        Returns ``[B, C, H, W]``."""
        b = x.shape[0]
        noise_labels = prepare_noise_labels(noise_labels, b, x.device)
        class_labels = prepare_labels(class_labels, self.label_dim, b, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 time path
            e = self.noise_embed(noise_labels.float())
            if self.label_embed is not None:
                e = e + self.label_embed(class_labels)
            w = guidance_term(self.guidance_embed, guidance, b, x.device)
            if w is not None:
                e = e + w
            e = F.silu(self.map1(F.silu(self.map0(e.float()))))
        e = e.to(x.dtype)
        skip = self.enc0(self.conv_in(x), e)
        h = self.enc1(fir_downsample(skip, self.box), e)
        h = self.dec0(torch.cat([fir_upsample(h, self.box), skip], dim=1), e)
        return self.conv_out(F.silu(self.norm_out(h)))
