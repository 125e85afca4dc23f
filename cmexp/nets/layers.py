"""Building blocks of the DDPM++/NCSN++ UNet family (Song et al. 2021, "Score-Based Generative
Modeling through SDEs", App. H) and of the tiny test UNet.

Written from the architecture descriptions (score_sde NCSN++ / DDPM++, BigGAN residual blocks,
FIR resampling of StyleGAN2); no code is copied from NVlabs/edm.

Conventions: images are ``[B, C, H, W]``; the per-sample conditioning embedding ``emb`` is
``[B, E]``; resampling changes H and W by a factor of 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT_HALF = 1.0 / math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def variance_scaling_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """In-place "fan_avg / uniform" variance-scaling init (score_sde ``default_init``).

    Draws from U(-a, a) with ``a = sqrt(3 scale / fan_avg)``, ``fan_avg = (fan_in + fan_out)/2``
    (scale 1 = Xavier/Glorot uniform). ``scale = 0`` is replaced by 1e-10 as in score_sde
    (``init_scale = 0``): the weights are tiny but not exactly zero, so the layer starts as an
    (almost) zero map while gradients still reach the layers before it.

    Args:
        weight: ``[out, in, *kernel]`` (conv) or ``[out, in]`` (linear).
        scale: variance multiplier; 0 means 1e-10.
    """
    scale = 1e-10 if scale == 0 else float(scale)
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv2d(
    in_channels: int, out_channels: int, kernel_size: int = 3, init_scale: float = 1.0
) -> nn.Conv2d:
    """Same-padded conv with bias, variance-scaling init and zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """Dense layer with variance-scaling init and zero bias."""
    layer = nn.Linear(in_features, out_features)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with ``min(max_groups, channels // 4)`` groups (score_sde), reduced to the
    largest count that divides ``channels`` (at least 1), so small widths work too."""
    groups = max(1, min(max_groups, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


# ---------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 / NCSN++): [1,3,3,1] ~ bilinear, [1,1] = box (avg-pool / nearest)
# ---------------------------------------------------------------------------------------------


def fir_kernel_2d(taps: Sequence[float]) -> Tensor:
    """Separable 2-D FIR kernel ``outer(k, k) / sum(k)^2`` from 1-D taps; shape ``[L, L]``."""
    k = torch.as_tensor(list(taps), dtype=torch.float32)
    if k.ndim != 1 or k.numel() < 1:
        raise ValueError(f"resample_filter must be a non-empty 1-D list, got {taps!r}")
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def _depthwise(kernel: Tensor, x: Tensor) -> Tensor:
    c = x.shape[1]
    return kernel.to(dtype=x.dtype, device=x.device)[None, None].expand(c, 1, *kernel.shape)


def fir_downsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Filter with ``kernel`` and keep every 2nd pixel: ``[B,C,H,W] -> [B,C,H/2,W/2]``.

    Output pixel i is centred on input position ``2i + 1/2`` (between the two pixels it
    replaces), so a box kernel [1,1] equals 2x2 average pooling.
    """
    n = kernel.shape[-1]
    pad = n - 2  # total padding per side pair so that the output has H/2 pixels
    x = F.pad(x, ((pad + 1) // 2, pad // 2, (pad + 1) // 2, pad // 2))
    return F.conv2d(x, _depthwise(kernel, x), stride=2, groups=x.shape[1])


def fir_upsample(x: Tensor, kernel: Tensor) -> Tensor:
    """Zero-insertion upsampling followed by ``4 * kernel``: ``[B,C,H,W] -> [B,C,2H,2W]``.

    [1,3,3,1] gives half-pixel-aligned bilinear upsampling, [1,1] nearest neighbour.
    """
    n = kernel.shape[-1]
    if n % 2:
        raise ValueError(f"FIR upsampling needs an even number of taps, got {n}")
    w = _depthwise(kernel * 4.0, x)
    return F.conv_transpose2d(x, w, stride=2, padding=(n - 2) // 2, groups=x.shape[1])


class FIRDownConv2d(nn.Module):
    """3x3 conv with FIR downsampling, as NCSN++'s ``Downsample(with_conv=True, fir=True)``
    used by the residual input pyramid: blur at full resolution, then a stride-2 conv whose
    output pixels are centred like :func:`fir_downsample`'s. ``[B,Ci,H,W] -> [B,Co,H/2,W/2]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample_filter: Sequence[float],
        kernel_size: int = 3,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, init_scale)
        self.conv.padding = (0, 0)
        self.register_buffer("fir", fir_kernel_2d(resample_filter), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, k = self.fir.shape[-1], self.conv.kernel_size[0]
        pad = n - 2 + k - 1
        x = F.pad(x, ((pad + 1) // 2, pad // 2, (pad + 1) // 2, pad // 2))
        x = F.conv2d(x, _depthwise(self.fir, x), groups=x.shape[1])
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2)


# ---------------------------------------------------------------------------------------------
# Noise-level embeddings: [B] -> [B, D]
# ---------------------------------------------------------------------------------------------


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2 pi w x), cos(2 pi w x)]``, ``w ~ N(0, scale^2)`` fixed
    (NCSN++; the CM CIFAR-10 config uses scale 16 on ``ln(sigma)/4``). ``[B] -> [B, dim]``.
    The frequencies are a buffer (not a parameter), so no parameter is left without gradient.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier embedding dim must be even, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        arg = (2 * math.pi) * x.float()[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding (DDPM++), frequencies ``max_positions^(-i/(dim/2))``.
    Designed for labels of order 1..1000 (e.g. ``250 ln(sigma)``, or ``999 t`` for VP).
    ``endpoint=True`` spaces the exponents over ``[0, 1]`` inclusive, ``max_positions^(-i/(dim/2
    - 1))``, as EDM's DDPM++ does (its released CIFAR-10 networks need it). ``[B] -> [B, dim]``."""

    def __init__(self, dim: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"positional embedding dim must be even, got {dim}")
        half = dim // 2
        denom = max(half - 1, 1) if endpoint else half
        freqs = torch.exp(
            -math.log(max_positions) * torch.arange(half, dtype=torch.float32) / denom
        )
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        arg = x.float()[:, None] * self.freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


# ---------------------------------------------------------------------------------------------
# Residual and attention blocks
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """BigGAN-style residual block with noise-embedding bias (NCSN++ ``ResnetBlockBigGAN``).

    ``h = conv0(resample(act(norm0(x)))) + dense(emb)``; ``h = conv1(dropout(act(norm1(h))))``;
    ``out = (skip(resample(x)) + h) * (1/sqrt(2) if skip_rescale else 1)``. ``skip`` is a 1x1
    conv when the channel count or resolution changes, identity otherwise; ``conv1`` uses
    ``init_scale`` (0 = near-zero init, so each block starts close to its skip path).

    Shapes: x ``[B, Ci, H, W]``, emb ``[B, E]`` -> ``[B, Co, H', W']`` with H' = 2H (up),
    H/2 (down) or H.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.norm0 = group_norm(in_channels)
        self.conv0 = conv2d(in_channels, out_channels, 3)
        self.emb = linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_channels, out_channels, 3, init_scale)
        needs_proj = in_channels != out_channels or up or down
        self.skip = conv2d(in_channels, out_channels, 1) if needs_proj else None
        if up or down:
            self.register_buffer("fir", fir_kernel_2d(resample_filter), persistent=False)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir_upsample(x, self.fir)
        if self.down:
            return fir_downsample(x, self.fir)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.emb(emb).to(h.dtype)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        out = x + h
        return out * SQRT_HALF if self.skip_rescale else out


class AttentionBlock(nn.Module):
    """Spatial self-attention over all H*W positions (NCSN++ ``AttnBlockpp``), single head by
    default, residual with optional 1/sqrt(2) rescale; output projection uses ``init_scale``.
    ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads, self.skip_rescale = num_heads, skip_rescale
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, 1)
        self.proj = conv2d(channels, channels, 1, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(-1, -2).reshape(b, c, hgt, wid))
        out = x + h
        return out * SQRT_HALF if self.skip_rescale else out
