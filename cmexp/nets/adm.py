"""ADM: the UNet of Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis"
(OpenAI guided-diffusion ``UNetModel``), as used by openai/consistency_models (ImageNet-64,
LSUN-256) and by EDM's ImageNet-64 model (``DhariwalUNet``).

Parameter names follow openai/consistency_models, so its released ``.pt`` files load with
``load_state_dict(strict=True)``: ``time_embed.{0,2}``, ``label_emb``, ``input_blocks.K.J``,
``middle_block.{0,1,2}``, ``output_blocks.K.J``, ``out.{0,2}``; residual blocks hold
``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``; attention
blocks ``norm``, ``qkv``, ``proj_out`` (1x1 ``Conv2d``; the q/k/v channels are ordered
(q|k|v, head, channel), as consistency_models' attention reads them).

Written from the paper and the published configurations; no code is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmexp.nets.guidance import GuidanceEmbedding, guidance_term
from cmexp.nets.unet import prepare_labels, prepare_noise_labels


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """ADM's sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i/(dim/2))``.
    ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 (ADM's ``normalization``); widths
    that 32 does not divide (small test nets only) use the largest group count below that does."""

    def __init__(self, channels: int) -> None:
        groups = min(32, channels)
        while channels % groups:
            groups -= 1
        super().__init__(groups, channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Resample(nn.Module):
    """Parameter-free 2x resampling: nearest-neighbour up or 2x2 average-pool down."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.mode == "down":
            return F.avg_pool2d(x, 2)
        return x


class ConvResample(nn.Module):
    """Up (nearest + 3x3 conv, key ``conv``) or down (stride-2 3x3 conv, key ``op``)
    resampling between levels when ``resblock_updown`` is off (ADM ``conv_resample``)."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "up":
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        else:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.op(x)


class ADMResBlock(nn.Module):
    """ADM residual block: ``h = conv(resample(silu(norm(x))))``; the embedding enters as a
    bias or, with ``use_scale_shift_norm``, as ``norm(h) (1 + scale) + shift``; then silu,
    dropout and a zero-initialised conv; ``out = skip(resample(x)) + h`` (no rescale).
    ``[B, Ci, H, W], [B, E] -> [B, Co, H', W']``."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        mode = "up" if up else "down" if down else "none"
        self.h_upd, self.x_upd = Resample(mode), Resample(mode)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[2](self.h_upd(self.in_layers[1](self.in_layers[0](x))))
        x = self.x_upd(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class ADMAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, ``x + proj_out(attn(norm(x)))``;
    heads of ``num_head_channels`` channels (or ``num_heads`` heads when that is -1).
    ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention width {channels} is not divisible by num_head_channels={num_head_channels}"
                )
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(
                f"attention width {channels} is not divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # [B, heads, HW, d]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, hgt, wid))


class EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ADMResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """ADM UNet: ``net(x [B,C,H,W], noise_labels [B], class_labels [B] | None) -> [B,C,H,W]``.

    ``noise_labels`` is the time input (consistency_models: ``250 ln(sigma)``, i.e. the
    wrapper's ``c_noise_scale = 250``; EDM's ImageNet model: ``ln(sigma)/4``). Class labels
    index ``label_emb``; None or ``label_dim`` (the null label) adds no label embedding, as
    EDM does for an all-zero label vector.

    Published configurations (``conf/net/adm_*.yaml``; parameter counts pinned in
    ``tests/unit/test_adm.py``): ImageNet-64 (consistency_models and EDM): model_channels 192,
    channel_mult (1, 2, 3, 4), 3 blocks, attention at 32/16/8, 64-channel heads, scale-shift
    norm, BigGAN up/down blocks, 1000 classes: 295,899,267 parameters (the CM paper's ~296M).
    LSUN-256: 256, (1, 1, 2, 2, 4, 4), 2 blocks, attention at 32/16/8, no scale-shift norm,
    unconditional: 526,304,771 parameters (with scale-shift norm it would be 552,807,171, the
    ADM paper's 552M LSUN model).
    """

    def __init__(
        self,
        img_resolution: int,  # Image height = width (64 ImageNet, 256 LSUN).
        img_channels: int,  # Input = output channels (3).
        label_dim: int = 0,  # Number of classes (1000 ImageNet), 0 = unconditional.
        model_channels: int = 192,  # Base width; 192 ImageNet-64, 256 LSUN-256.
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # Width multipliers per resolution.
        num_blocks: int = 3,  # Residual blocks per resolution; 3 ImageNet-64, 2 LSUN.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions with self-attention.
        num_heads: int = 1,  # Heads when num_head_channels = -1.
        num_head_channels: int = 64,  # Channels per head; 64 in both releases.
        dropout: float = 0.0,  # 0 for CD/CT students, 0.1 for the EDM teachers.
        use_scale_shift_norm: bool = True,  # FiLM-style embedding; True ImageNet-64, False LSUN.
        resblock_updown: bool = True,  # BigGAN residual up/down blocks; True in both.
        guidance_embed: bool = False,  # Guidance-scale input w (guided CD students; zero-init).
    ) -> None:
        super().__init__()
        channel_mult, attn_resolutions = (
            tuple(int(m) for m in channel_mult),
            tuple(attn_resolutions),
        )
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"img_resolution={img_resolution} not divisible by 2^(len(channel_mult)-1)"
            )
        if label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {label_dim}")
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim, self.model_channels = int(label_dim), int(model_channels)
        emb_channels = 4 * model_channels
        block = {
            "emb_channels": emb_channels,
            "dropout": dropout,
            "use_scale_shift_norm": use_scale_shift_norm,
        }
        attn = {"num_heads": num_heads, "num_head_channels": num_head_channels}

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels),
            nn.SiLU(),
            nn.Linear(emb_channels, emb_channels),
        )
        self.label_emb = nn.Embedding(label_dim, emb_channels) if label_dim > 0 else None
        self.guidance_embed = GuidanceEmbedding(emb_channels) if guidance_embed else None

        ch = channel_mult[0] * model_channels
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(img_channels, ch, 3, padding=1))]
        )
        skips, res = [ch], img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers: list[nn.Module] = [
                    ADMResBlock(ch, out_channels=mult * model_channels, **block)
                ]
                ch = mult * model_channels
                if res in attn_resolutions:
                    layers.append(ADMAttention(ch, **attn))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                down = (
                    ADMResBlock(ch, out_channels=ch, down=True, **block)
                    if resblock_updown
                    else ConvResample(ch, "down")
                )
                self.input_blocks.append(EmbedSequential(down))
                skips.append(ch)
                res //= 2

        self.middle_block = EmbedSequential(
            ADMResBlock(ch, out_channels=ch, **block),
            ADMAttention(ch, **attn),
            ADMResBlock(ch, out_channels=ch, **block),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_blocks + 1):
                layers = [
                    ADMResBlock(ch + skips.pop(), out_channels=mult * model_channels, **block)
                ]
                ch = mult * model_channels
                if res in attn_resolutions:
                    layers.append(ADMAttention(ch, **attn))
                if level and i == num_blocks:
                    layers.append(
                        ADMResBlock(ch, out_channels=ch, up=True, **block)
                        if resblock_updown
                        else ConvResample(ch, "up")
                    )
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skips

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, img_channels, 3, padding=1))
        )

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """Args:
            x: ``[B, C, H, W]`` scaled input (c_in x).
            noise_labels: ``[B]`` float time input (c_noise).
            class_labels: None or int64 ``[B]`` in ``[0, label_dim]`` (``label_dim`` = null).
            guidance: None or w (scalar or ``[B]``) of a guided student (``guidance_embed``).

        Returns:
            ``[B, C, H, W]``, same dtype as x.
        """
        b = x.shape[0]
        noise_labels = prepare_noise_labels(noise_labels, b, x.device)
        labels = prepare_labels(class_labels, self.label_dim, b, x.device)
        emb = self.time_embed(timestep_embedding(noise_labels, self.model_channels))
        if self.label_emb is not None and labels is not None:
            known = labels < self.label_dim
            emb = emb + self.label_emb(labels.clamp(max=self.label_dim - 1)) * known[:, None].to(
                emb.dtype
            )
        w = guidance_term(self.guidance_embed, guidance, b, x.device)
        if w is not None:
            emb = emb + w.to(emb.dtype)
        emb = emb.to(x.dtype)
        h, hs = x, []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
