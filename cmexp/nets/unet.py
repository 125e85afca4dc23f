"""DDPM++ / NCSN++ UNet family (Song et al. 2021, App. H), the CIFAR-10 network of the
Consistency Models paper (App. C: "NCSN++ architecture in Song et al. 2021").

One configurable class, :class:`SongUNet`; the two variants differ only in constructor values:

====================  ==========================  ==========================
option                NCSN++ (CM CIFAR-10, VE)    DDPM++ (EDM's VP network)
====================  ==========================  ==========================
embedding_type        "fourier" (scale 16)        "positional"
resample_filter       [1, 3, 3, 1] (FIR)          [1, 1] (box)
progressive_input     "residual"                  "none"
noise_channels_mult   2 (256 Fourier features)    1 (128 features)
====================  ==========================  ==========================

Common: model_channels 128, channel_mult (2, 2, 2), 4 residual blocks per resolution, attention
at 16x16 (and in the middle), BigGAN residual blocks (up/down sampling inside the block),
skip_rescale 1/sqrt(2), GroupNorm (<= 32 groups) + SiLU, init_scale 0 for the last conv of every
residual branch and the output conv, progressive output "none", 4*model_channels embedding.

Written from the score_sde NCSN++ description; no code copied from NVlabs/edm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmexp.nets.guidance import GuidanceEmbedding, guidance_term
from cmexp.nets.layers import (
    SQRT_HALF,
    AttentionBlock,
    FIRDownConv2d,
    GaussianFourierEmbedding,
    PositionalEmbedding,
    ResBlock,
    conv2d,
    group_norm,
    linear,
)


def prepare_labels(
    class_labels: Tensor | None, label_dim: int, batch: int, device: torch.device
) -> Tensor | None:
    """Validate class labels for a net with ``label_dim`` classes.

    Args:
        class_labels: None or int ``[B]`` in ``[0, label_dim]``; ``label_dim`` is the "null"
            label used for classifier-free guidance.
        label_dim: number of classes; 0 = unconditional.
        batch: B.
        device: device of the returned labels.

    Returns:
        int64 ``[B]`` labels (None -> all null labels) or None for unconditional nets.

    Raises:
        ValueError: labels given to an unconditional net, or wrong shape/dtype/range.
    """
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels given to an unconditional net (label_dim=0)")
        return None
    if class_labels is None:
        return torch.full((batch,), label_dim, dtype=torch.long, device=device)
    if class_labels.shape != (batch,) or class_labels.is_floating_point():
        raise ValueError(
            f"class_labels must be integer [B={batch}], got {class_labels.dtype} "
            f"{tuple(class_labels.shape)}"
        )
    return class_labels.to(device=device, dtype=torch.long)


def prepare_noise_labels(noise_labels: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Return ``noise_labels`` as float ``[B]`` (a scalar or ``[1]`` is broadcast)."""
    noise_labels = torch.as_tensor(noise_labels, device=device)
    if noise_labels.numel() == 1:
        noise_labels = noise_labels.reshape(1).expand(batch)
    if noise_labels.shape != (batch,):
        raise ValueError(f"noise_labels must be [B={batch}], got {tuple(noise_labels.shape)}")
    return noise_labels.float()


class SongUNet(nn.Module):
    """NCSN++ / DDPM++ UNet: ``net(x [B,C,H,W], noise_labels [B], class_labels [B] | None)
    -> [B,C,H,W]``. Knows nothing about sigma: ``noise_labels`` is c_noise.

    Parameter counts (32x32, img_channels 3, label_dim 0; pinned in tests/unit/test_nets.py):
    NCSN++ 56,395,523 and DDPM++ 55,732,739, i.e. ~56M like EDM's CIFAR-10 VE/VP networks,
    which share the (2, 2, 2) x 4-block layout. NCSN++ is 662,784 larger than DDPM++: the
    residual input pyramid (two FIR down-convs 3->256 and 256->256, 597,248) and the 256-wide
    Fourier features feeding the first embedding layer (65,536). The Fourier frequencies are a
    buffer, not parameters (score_sde stores them as a frozen parameter, +128).
    """

    def __init__(
        self,
        img_resolution: int,  # Image height = width (32 for CIFAR-10).
        img_channels: int,  # Input = output channels (3 for RGB).
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        model_channels: int = 128,  # Base width nf; 128 in both papers.
        channel_mult: Sequence[int] = (
            2,
            2,
            2,
        ),  # Width multipliers per resolution; (2,2,2) CM/EDM CIFAR-10.
        num_blocks: int = 4,  # Residual blocks per resolution; 4 (iCT-deep: 8).
        attn_resolutions: Sequence[int] = (16,),  # Resolutions with self-attention; (16,).
        dropout: float = 0.0,  # Dropout in residual blocks; 0 CM, 0.13 EDM teacher.
        embedding_type: str = "fourier",  # "fourier" (NCSN++) or "positional" (DDPM++).
        fourier_scale: float = 16.0,  # Std of Fourier frequencies; 16 (iCT: 0.02).
        noise_channels_mult: int = 2,  # Noise-embedding width / nf; 2 NCSN++, 1 DDPM++.
        emb_channels_mult: int = 4,  # Conditioning-embedding width / nf; 4.
        resample_filter: Sequence[int] = (1, 3, 3, 1),  # FIR taps; [1,3,3,1] NCSN++, [1,1] DDPM++.
        progressive_input: str = "residual",  # "residual" input pyramid (NCSN++) or "none" (DDPM++).
        skip_rescale: bool = True,  # Scale residual sums by 1/sqrt(2); True.
        init_scale: float = 0.0,  # Init scale of last convs; 0 -> near-zero (score_sde).
        num_heads: int = 1,  # Attention heads; 1.
        positional_endpoint: bool = False,  # Positional frequencies ending at 1/10000 (EDM's DDPM++: True).
        guidance_embed: bool = False,  # Guidance-scale input w (guided CD students; zero-init).
    ) -> None:
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        resample_filter = tuple(resample_filter)
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(
                f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}"
            )
        if progressive_input not in ("none", "residual"):
            raise ValueError(
                f"progressive_input must be 'none' or 'residual', got {progressive_input!r}"
            )
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"img_resolution={img_resolution} not divisible by 2^(len(channel_mult)-1)"
            )
        if label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {label_dim}")
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim = int(label_dim)
        self.skip_rescale = skip_rescale
        self.progressive_input = progressive_input

        nf = model_channels
        noise_channels, emb_channels = nf * noise_channels_mult, nf * emb_channels_mult
        block = dict(
            emb_channels=emb_channels,
            dropout=dropout,
            resample_filter=resample_filter,
            skip_rescale=skip_rescale,
            init_scale=init_scale,
        )
        attn = dict(num_heads=num_heads, skip_rescale=skip_rescale, init_scale=init_scale)

        # Conditioning: noise embedding (+ class embedding) -> 2-layer MLP -> emb [B, 4 nf].
        if embedding_type == "fourier":
            self.noise_embed: nn.Module = GaussianFourierEmbedding(noise_channels, fourier_scale)
        else:
            self.noise_embed = PositionalEmbedding(noise_channels, endpoint=positional_endpoint)
        self.label_embed = (
            nn.Embedding(label_dim + 1, noise_channels) if label_dim > 0 else None
        )  # row label_dim = "null" label (classifier-free guidance)
        self.guidance_embed = GuidanceEmbedding(noise_channels) if guidance_embed else None
        self.map0 = linear(noise_channels, emb_channels)
        self.map1 = linear(emb_channels, emb_channels)

        # Encoder.
        self.conv_in = conv2d(img_channels, nf, 3)
        skip_channels, cin, aux_channels = [nf], nf, img_channels
        self.enc_blocks, self.enc_attn = nn.ModuleList(), nn.ModuleList()
        self.enc_down, self.enc_aux = nn.ModuleList(), nn.ModuleList()
        res = img_resolution
        for level, mult in enumerate(channel_mult):
            cout = nf * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(ResBlock(cin, cout, **block))
                attns.append(
                    AttentionBlock(cout, **attn) if res in attn_resolutions else nn.Identity()
                )
                cin = cout
                skip_channels.append(cout)
            self.enc_blocks.append(blocks)
            self.enc_attn.append(attns)
            if level < len(channel_mult) - 1:
                self.enc_down.append(ResBlock(cout, cout, down=True, **block))
                if progressive_input == "residual":
                    self.enc_aux.append(FIRDownConv2d(aux_channels, cout, resample_filter))
                    aux_channels = cout
                skip_channels.append(cout)
                res //= 2

        # Middle.
        self.mid0 = ResBlock(cin, cin, **block)
        self.mid_attn = AttentionBlock(cin, **attn)
        self.mid1 = ResBlock(cin, cin, **block)

        # Decoder (levels stored from lowest resolution up).
        self.dec_blocks, self.dec_attn, self.dec_up = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        for level, mult in reversed(list(enumerate(channel_mult))):
            cout = nf * mult
            blocks = nn.ModuleList()
            for _ in range(num_blocks + 1):
                blocks.append(ResBlock(cin + skip_channels.pop(), cout, **block))
                cin = cout
            self.dec_blocks.append(blocks)
            self.dec_attn.append(
                AttentionBlock(cout, **attn) if res in attn_resolutions else nn.Identity()
            )
            if level > 0:
                self.dec_up.append(ResBlock(cout, cout, up=True, **block))
                res *= 2
        assert not skip_channels

        self.norm_out = group_norm(cin)
        self.conv_out = conv2d(cin, img_channels, 3, init_scale)

    def embed(
        self, noise_labels: Tensor, class_labels: Tensor | None, guidance: Tensor | None = None
    ) -> Tensor:
        """Conditioning embedding ``[B] (+ [B] labels) (+ [B] w) -> [B, emb_channels]`` (after
        the final SiLU), always in float32 (autocast off: continuous-time CMs need an fp32 time
        path, sCM Sec. 4.1 / NVlabs/rcm#10)."""
        with torch.autocast(device_type=noise_labels.device.type, enabled=False):
            emb = self.noise_embed(noise_labels.float())
            if self.label_embed is not None:
                emb = emb + self.label_embed(class_labels)
            w = guidance_term(self.guidance_embed, guidance, emb.shape[0], emb.device)
            if w is not None:
                emb = emb + w
            return F.silu(self.map1(F.silu(self.map0(emb.float()))))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """Args:
            x: ``[B, C, H, W]`` scaled input (c_in x).
            noise_labels: ``[B]`` float c_noise (e.g. ln(sigma)/4).
            class_labels: None or int64 ``[B]`` in ``[0, label_dim]`` (``label_dim`` = null;
                None on a conditional net = all null).
            guidance: None or the guidance scale w (scalar or ``[B]``) of a guided CD student
                (``guidance_embed=True``; :mod:`cmexp.nets.guidance`).

        Returns:
            ``[B, C, H, W]``, same dtype as x.
        """
        b = x.shape[0]
        noise_labels = prepare_noise_labels(noise_labels, b, x.device)
        class_labels = prepare_labels(class_labels, self.label_dim, b, x.device)
        emb = self.embed(noise_labels, class_labels, guidance).to(x.dtype)

        aux = x
        h = self.conv_in(x)
        skips = [h]
        for level, (blocks, attns) in enumerate(zip(self.enc_blocks, self.enc_attn)):
            for blk, att in zip(blocks, attns):
                h = att(blk(h, emb))
                skips.append(h)
            if level < len(self.enc_down):
                h = self.enc_down[level](h, emb)
                if self.progressive_input == "residual":
                    aux = self.enc_aux[level](aux)
                    aux = (aux + h) * SQRT_HALF if self.skip_rescale else aux + h
                    h = aux
                skips.append(h)

        h = self.mid1(self.mid_attn(self.mid0(h, emb)), emb)

        for level, (blocks, att) in enumerate(zip(self.dec_blocks, self.dec_attn)):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            h = att(h)
            if level < len(self.dec_up):
                h = self.dec_up[level](h, emb)

        return self.conv_out(F.silu(self.norm_out(h)))
