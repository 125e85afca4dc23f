"""ADMUNet -> diffusers ``UNet2DModel`` (``cmexp.inference.to_diffusers``): the same forward pass
for every ADM variant the mapping handles (scale-shift norm on/off, residual or conv
resampling, attention at one or two levels, class labels), and one-line refusals naming what
exports for everything UNet2DModel / CMStochasticIterativeScheduler cannot represent."""

from __future__ import annotations

import pytest
import torch

from cmexp.diffusion.precond import CMPrecond, EDMPrecond
from cmexp.diffusion.trigflow import TrigFlowPrecond
from cmexp.inference.to_diffusers import (
    check_exportable,
    grid_timesteps,
    unet_config,
    unet_state_dict,
)
from cmexp.nets import ADMUNet, SongUNet


def _adm(label_dim: int = 0, **kw) -> ADMUNet:
    torch.manual_seed(0)
    kw = {"attn_resolutions": (8,), "num_head_channels": 32, **kw}
    net = ADMUNet(16, 3, label_dim, 32, kw.pop("channel_mult", (1, 2)), 1, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised output convs would hide most of the network
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"label_dim": 5},
        {"use_scale_shift_norm": False},  # consistency_models' LSUN-256 layout
        {"resblock_updown": False},  # stride-2 / nearest+conv resampling
        {"resblock_updown": False, "use_scale_shift_norm": False, "attn_resolutions": (16, 8)},
        {
            "channel_mult": (1, 2, 2),
            "attn_resolutions": (4,),
            "num_head_channels": -1,
            "num_heads": 2,
        },
    ],
    ids=["film", "labels", "no-film", "conv-resample", "conv-2attn", "3-levels-heads"],
)
def test_unet2dmodel_computes_the_same_function(kw: dict) -> None:
    from diffusers import UNet2DModel

    net = _adm(**kw)
    unet = UNet2DModel(**unet_config(net))
    unet.load_state_dict(unet_state_dict(net), strict=True)  # every key used, none missing
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = 250 * torch.log(torch.tensor([80.0, 0.9, 0.002]))  # consistency_models' c_noise
    labels = torch.tensor([0, 4, 2]) if net.label_dim else None
    with torch.no_grad():
        ours, theirs = net(x, t, labels), unet.eval()(x, t, class_labels=labels).sample
    assert ours.abs().mean() > 0.1  # not a trivially small output
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)


def test_config_names_the_blocks() -> None:
    cfg = unet_config(_adm(resblock_updown=False, channel_mult=(1, 2, 2), attn_resolutions=(8,)))
    assert cfg["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert cfg["block_out_channels"] == [32, 64, 64] and cfg["layers_per_block"] == 1
    cfg = unet_config(_adm(label_dim=7))
    assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]
    assert cfg["up_block_types"] == ["AttnUpBlock2D", "ResnetUpsampleBlock2D"]
    assert cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["num_class_embeds"] == 7
    assert cfg["attention_head_dim"] == 32 and cfg["time_embedding_dim"] == 128


EXPORTS = "format=diffusers exports ADMUNet consistency models (kind cd, ct or ect) with c_noise_scale=250"


@pytest.mark.parametrize(
    ("make", "kind", "message"),
    [
        (
            lambda: CMPrecond(_adm(), c_noise_scale=0.25),
            "ct",
            "was trained with c_noise_scale=0.25, but",
        ),
        (
            lambda: EDMPrecond(_adm(), c_noise_scale=250),
            "edm",
            "is a 'edm' model, not a consistency model",
        ),
        (lambda: TrigFlowPrecond(_adm(), c_noise_scale=250), "sct", "is a TrigFlow model (sCT)"),
        (
            lambda: CMPrecond(
                SongUNet(16, 3, model_channels=32, channel_mult=(1, 2), num_blocks=1),
                c_noise_scale=250,
            ),
            "cd",
            "uses SongUNet (NCSN++), which diffusers' UNet2DModel cannot represent exactly",
        ),
        (
            lambda: CMPrecond(
                SongUNet(
                    16,
                    3,
                    model_channels=32,
                    channel_mult=(1, 2),
                    num_blocks=1,
                    embedding_type="positional",
                ),
                c_noise_scale=250,
            ),
            "ct",
            "uses SongUNet (DDPM++), which",
        ),
    ],
    ids=["c_noise_scale", "edm", "sct", "ncsnpp", "ddpmpp"],
)
def test_what_does_not_export_is_named(make, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match="^format=diffusers: ckpt=m.ckpt ") as err:
        check_exportable(make(), kind, "m.ckpt")
    text = str(err.value)
    assert message in text and text.endswith(
        "net=adm_imagenet64 / adm_lsun256 runs with model.precond.c_noise_scale=250, openai/consistency_models cd_*/ct_* files"
    )
    assert EXPORTS in text and "\n" not in text


def test_adm_layouts_without_a_unet2dmodel_counterpart() -> None:
    with pytest.raises(ValueError, match="channel_mult must start with 1"):
        check_exportable(CMPrecond(_adm(channel_mult=(2, 2)), c_noise_scale=250), "cd", "m.ckpt")
    with pytest.raises(ValueError, match=r"its GroupNorms use \[16, 24, 32\] groups"):
        net = ADMUNet(16, 3, 0, 16, (1, 2), 1, (8,), num_head_channels=16)
        check_exportable(CMPrecond(net, c_noise_scale=250), "cd", "m.ckpt")
    with pytest.raises(ValueError, match=r"attention heads are \[32, 64\] channels wide"):
        net = ADMUNet(16, 3, 0, 32, (1, 2), 1, (16, 8), num_heads=1, num_head_channels=-1)
        check_exportable(CMPrecond(net, c_noise_scale=250), "cd", "m.ckpt")
    # ECT samples with CMPrecond's scalings: it exports
    check_exportable(CMPrecond(_adm(), c_noise_scale=250), "ect", "m.ckpt")


def test_grid_timesteps_are_the_plans_grid_indices_reversed() -> None:
    from cmexp.diffusion.karras import karras_sigmas

    grid = karras_sigmas(40, 0.002, 80.0, 7.0, dtype=torch.float64)
    # cd_imagenet64_lpips: launch.sh --ts 0,22,39
    assert grid_timesteps([80.0, float(grid[22])], grid) == ([22, 0], True)
    assert grid_timesteps([80.0, float(grid[5]), float(grid[30])], grid)[0] == [30, 5, 0]
    assert grid_timesteps([80.0, 0.585], grid) == ([25, 0], False)  # not a level of this grid
