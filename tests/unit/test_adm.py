"""The ADM network (``cmexp.nets.ADMUNet``): the released configurations' parameter counts
(built on the meta device), the raw-net contract, and its forward pass against an independent
functional reference of guided-diffusion's UNetModel on the same state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor

from cmexp.nets import ADMUNet
from cmexp.utils.cli import CONF_DIR


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("net", "dataset", "params"),
    [
        # consistency_models ImageNet-64 (and EDM's edm-imagenet-64x64-cond-adm.pkl): the CM paper's ~296M
        ("adm_imagenet64", ["dataset.resolution=64", "dataset.num_classes=1000"], 295_899_267),
        # consistency_models LSUN-256 (no scale-shift norm, unconditional); ADM's 552M LSUN model
        # differs only by scale-shift norm (checked below)
        ("adm_lsun256", ["dataset.resolution=256", "dataset.num_classes=0"], 526_304_771),
    ],
)
def test_released_configurations_parameter_counts(
    net: str, dataset: list[str], params: int
) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"net={net}", "dataset=cifar10", *dataset])
    with torch.device("meta"):
        model = instantiate(cfg.net)
    assert isinstance(model, ADMUNet)
    assert _count(model) == params
    if net == "adm_lsun256":
        with torch.device("meta"):
            film = ADMUNet(
                256, 3, 0, 256, (1, 1, 2, 2, 4, 4), 2, (32, 16, 8), use_scale_shift_norm=True
            )
        assert _count(film) == 552_807_171  # Dhariwal & Nichol 2021, Table 10: 552M (LSUN)


def _small(**kw) -> ADMUNet:
    torch.manual_seed(0)
    net = ADMUNet(16, 3, kw.pop("label_dim", 4), 64, (1, 2), 1, (8,), num_head_channels=32, **kw)
    with torch.no_grad():  # the zero-initialised output convs would hide most of the network
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_contract_labels_and_resampling_variants() -> None:
    net = _small()
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.tensor([1.0, 50.0, -3.0]), torch.tensor([0, 3, 4]))  # 4 = the null label
    assert out.shape == x.shape and (net.img_resolution, net.img_channels, net.label_dim) == (
        16,
        3,
        4,
    )
    null = net(x, torch.tensor([1.0, 50.0, -3.0]), None)
    assert torch.equal(out[2], null[2]) and not torch.allclose(out[0], null[0])
    with pytest.raises(ValueError, match="class_labels"):
        ADMUNet(16, 3, 0, 64, (1, 2), 1, (8,), num_head_channels=32)(
            x, torch.ones(3), torch.zeros(3, dtype=torch.long)
        )
    for kw in ({"resblock_updown": False}, {"use_scale_shift_norm": False}):
        assert _small(**kw)(x, torch.ones(3)).shape == x.shape
    assert "input_blocks.2.0.op.weight" in _small(resblock_updown=False).state_dict()


# --------------------------------------------------------------------------- functional reference
def _gn(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.group_norm(x.float(), 32, sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _resblock(
    sd: dict[str, Tensor], p: str, x: Tensor, emb: Tensor, mode: str, film: bool
) -> Tensor:
    h = F.silu(_gn(sd, p + ".in_layers.0", x))
    if mode == "up":
        h, x = (
            F.interpolate(h, scale_factor=2.0, mode="nearest"),
            F.interpolate(x, scale_factor=2.0, mode="nearest"),
        )
    elif mode == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[p + ".in_layers.2.weight"], sd[p + ".in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[
        ..., None, None
    ]
    if film:
        scale, shift = torch.chunk(e, 2, dim=1)
        h = _gn(sd, p + ".out_layers.0", h) * (1 + scale) + shift
    else:
        h = _gn(sd, p + ".out_layers.0", h + e)
    h = F.conv2d(
        F.silu(h), sd[p + ".out_layers.3.weight"], sd[p + ".out_layers.3.bias"], padding=1
    )
    if p + ".skip_connection.weight" in sd:
        x = F.conv2d(x, sd[p + ".skip_connection.weight"], sd[p + ".skip_connection.bias"])
    return x + h


def _attention(sd: dict[str, Tensor], p: str, x: Tensor, head_channels: int) -> Tensor:
    """consistency_models' attention: qkv channels as (three, heads, d), softmax(q k / sqrt(d))."""
    b, c, hh, ww = x.shape
    qkv = F.conv2d(_gn(sd, p + ".norm", x), sd[p + ".qkv.weight"], sd[p + ".qkv.bias"]).reshape(
        b, 3 * c, -1
    )
    heads = c // head_channels
    q, k, v = qkv.reshape(b, 3, heads, head_channels, -1).unbind(1)  # [b, heads, d, s]
    w = torch.einsum("bhdt,bhds->bhts", q / head_channels**0.25, k / head_channels**0.25).softmax(
        -1
    )
    a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, hh, ww)
    return x + F.conv2d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])


def reference_unet(
    sd: dict[str, Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor | None,
    film: bool,
    head: int,
    updown: dict[str, str],
) -> Tensor:
    """guided-diffusion's UNetModel.forward on a state dict, walking its block indices;
    ``updown`` names the residual blocks that resample ("up"/"down")."""
    mc = sd["time_embed.0.weight"].shape[1]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"]))
    emb = F.linear(emb, sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def run(prefix: str, h: Tensor) -> Tensor:
        j = 0
        while any(k.startswith(f"{prefix}.{j}.") for k in sd):
            p = f"{prefix}.{j}"
            if p + ".qkv.weight" in sd:
                h = _attention(sd, p, h, head)
            elif p + ".in_layers.0.weight" in sd:
                h = _resblock(sd, p, h, emb, updown.get(p, "none"), film)
            else:
                h = F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], padding=1)
            j += 1
        return h

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    hs, h = [], x
    for k in range(count("input_blocks")):
        h = run(f"input_blocks.{k}", h)
        hs.append(h)
    h = run("middle_block", h)
    for k in range(count("output_blocks")):
        h = run(f"output_blocks.{k}", torch.cat([h, hs.pop()], dim=1))
    h = F.silu(_gn(sd, "out.0", h))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


@pytest.mark.parametrize("film", [True, False])
def test_forward_equals_guided_diffusion_reference(film: bool) -> None:
    net = _small(use_scale_shift_norm=film)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    # channel_mult (1, 2), 1 block, attention at 8: input (conv, block, DOWN, block+attn), output
    # (block+attn, block+attn+UP, block, block)
    updown = {"input_blocks.2.0": "down", "output_blocks.1.2": "up"}
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = reference_unet(sd, x, t, y, film, 32, updown)
        torch.testing.assert_close(net(x, t, y), ref, rtol=1e-5, atol=1e-5)
