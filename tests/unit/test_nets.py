"""Networks: the CIFAR-10 NCSN++ parameter count (pinned), shapes, labels, dropout, resampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmexp.nets import SongUNet, TinyUNet
from cmexp.nets.layers import fir_downsample, fir_kernel_2d, fir_upsample


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_cifar10_ncsnpp_and_ddpmpp_parameter_counts_are_pinned() -> None:
    # CM paper App. C: NCSN++ (nf 128, ch_mult 2,2,2, 4 blocks, attention at 16, FIR, Fourier 16,
    # skip rescale, residual progressive input); EDM's DDPM++ for comparison.
    torch.manual_seed(0)
    ncsnpp = SongUNet(32, 3)
    assert _count(ncsnpp) == 56_395_523
    ddpmpp = SongUNet(
        32,
        3,
        embedding_type="positional",
        resample_filter=(1, 1),
        progressive_input="none",
        noise_channels_mult=1,
    )
    assert _count(ddpmpp) == 55_732_739
    # one forward of the full CIFAR-10 network (batch 1): shape kept, init_scale 0 -> ~0 output
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = ncsnpp(x, torch.tensor([0.25 * math.log(80.0)]))
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    assert y.abs().max().item() < 1e-2


@pytest.mark.parametrize(
    "make",
    [
        lambda c, **kw: SongUNet(
            16,
            c,
            model_channels=16,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(8,),
            **kw,
        ),
        lambda c, **kw: SongUNet(
            16,
            c,
            model_channels=16,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(8,),
            embedding_type="positional",
            resample_filter=(1, 1),
            progressive_input="none",
            **kw,
        ),
        lambda c, **kw: TinyUNet(16, c, **kw),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_labels_dropout_and_gradients(make, channels) -> None:
    torch.manual_seed(0)
    x, noise = torch.randn(2, channels, 16, 16), torch.randn(2)
    net = make(channels)
    assert net(x, noise).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        net(x, noise, torch.tensor([0, 1]))
    cond = make(channels, label_dim=4)
    y_lab = cond(x, noise, torch.tensor([0, 1]))
    y_null = cond(x, noise, None)
    torch.testing.assert_close(y_null, cond(x, noise, torch.tensor([4, 4])))
    assert y_lab.shape == x.shape
    assert not torch.equal(y_lab, y_null)  # the label embedding reaches the output
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, noise, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, torch.randn(3))
    assert net(x, torch.tensor(0.1)).shape == x.shape  # a scalar noise label is broadcast
    assert (net.img_resolution, net.img_channels, net.label_dim, cond.label_dim) == (
        16,
        channels,
        0,
        4,
    )
    drop = make(channels, dropout=0.5)
    drop.train()
    for p in drop.parameters():  # make the residual branches matter
        torch.nn.init.normal_(p, std=0.05)
    assert not torch.equal(drop(x, noise), drop(x, noise))
    drop.eval()
    assert torch.equal(drop(x, noise), drop(x, noise))
    net(x, noise).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing
    cond(x, noise, torch.tensor([0, 1])).square().mean().backward()
    missing = [
        n for n, p in cond.named_parameters() if p.grad is None or not bool(p.grad.ne(0).any())
    ]
    # every parameter, the label embedding included, gets a nonzero gradient
    assert missing == [], missing


def test_fir_resampling() -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fir_downsample(x, fir_kernel_2d((1, 1))), F.avg_pool2d(x, 2))
    const = torch.full((1, 2, 8, 8), 3.0)
    k = fir_kernel_2d((1, 3, 3, 1))
    up = fir_upsample(const, k)
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    down = fir_downsample(up, k)
    assert down.shape == const.shape
    torch.testing.assert_close(down[..., 2:-2, 2:-2], torch.full_like(down[..., 2:-2, 2:-2], 3.0))
    # box filter up = nearest neighbour; [1,3,3,1] up = half-pixel bilinear (align_corners=False)
    nearest = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(fir_upsample(x, fir_kernel_2d((1, 1))), nearest)
    bil = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(fir_upsample(x, k)[..., 1:-1, 1:-1], bil[..., 1:-1, 1:-1])
    # kernels are normalised: a constant keeps its value through FIRDownConv2d's blur, too
    torch.testing.assert_close(fir_kernel_2d((1, 3, 3, 1)).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="even"):
        fir_upsample(x, fir_kernel_2d((1, 2, 1)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="embedding_type"):
        SongUNet(16, 1, embedding_type="sinus")
    with pytest.raises(ValueError, match="img_resolution"):
        SongUNet(18, 1, channel_mult=(1, 2, 2))
