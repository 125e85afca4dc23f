"""Latent mode's parts: the autoencoder (shapes, KL closed form, it reconstructs after a short
training), the scale factor (unit-variance latents), the latent datamodule (cache, flips,
resume) and generation that samples latents unclamped and decodes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmexp.inference.latent import LatentCodec, check_latent_shape
from cmexp.methods.autoencoder.module import AutoencoderLitModule, psnr
from cmexp.nets.autoencoder import ConvAutoencoder, gaussian_kl


def _blobs(n: int, seed: int = 0, channels: int = 1, res: int = 32) -> torch.Tensor:
    """Smooth synthetic images in [-1, 1]: two Gaussian blobs of random position and width."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, res)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    out = torch.full((n, channels, res, res), -1.0)
    for _ in range(2):
        cy, cx = (torch.rand(2, n, 1, 1, 1, generator=gen) * 1.2 - 0.6).unbind(0)
        w = torch.rand(n, 1, 1, 1, generator=gen) * 0.2 + 0.15
        out = out + 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w**2))
    return out.clamp(-1, 1)


def test_autoencoder_shapes_and_factor() -> None:
    ae = ConvAutoencoder(32, 3, latent_channels=4, model_channels=4, channel_mult=(1, 2, 2))
    mean, logvar = ae.encode(torch.zeros(2, 3, 32, 32))
    assert (
        mean.shape == logvar.shape == (2, 4, 8, 8) and ae.latent_resolution == 8 and ae.factor == 4
    )
    assert ae.decode(mean).shape == (2, 3, 32, 32)
    assert ConvAutoencoder(32, 1, 2, 4, (1, 2)).encode(torch.zeros(1, 1, 32, 32))[0].shape == (
        1,
        2,
        16,
        16,
    )
    with pytest.raises(ValueError, match=r"net.img_resolution=30 must be divisible by 4"):
        ConvAutoencoder(30, 1, 4, 4, (1, 2, 2))


def test_gaussian_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(gaussian_kl(mean, logvar), expected, atol=1e-5)
    assert torch.allclose(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_psnr_closed_form() -> None:
    x = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(
        psnr(x + 0.2, x), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.04)))
    )


def test_autoencoder_reconstructs_after_a_short_training() -> None:
    """A tiny autoencoder (16x16x1 -> 8x8x4) learns smooth blobs in 150 Adam steps: test PSNR
    above 22 dB and 10 dB above the untrained net's (about 7 dB; 26.6 dB after training)."""
    torch.manual_seed(0)
    train, test = _blobs(256, seed=0, res=16), _blobs(64, seed=1, res=16)
    module = AutoencoderLitModule(
        ConvAutoencoder(16, 1, 4, 8, (1, 2)),
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        scale_images=256,
        psnr_images=64,
    )
    before = module.statistics(train, test)["psnr"]
    opt = module.configure_optimizers()
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = train[torch.randint(0, len(train), (16,), generator=gen)]
        recon, mean, logvar = module.net(x, torch.randn(16, 4, 8, 8, generator=gen))
        kl = gaussian_kl(mean, logvar) / x[0].numel()
        loss = (module.reconstruction(recon, x) + module.kl_weight * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.statistics(train, test)["psnr"]
    assert after > 22.0 and after > before + 10, (before, after)


def test_scale_factor_gives_unit_variance_latents() -> None:
    torch.manual_seed(0)
    ae = ConvAutoencoder(32, 1, 4, 4, (1, 2, 2))
    module = AutoencoderLitModule(ae, optimizer=torch.optim.Adam, scale_images=2, psnr_images=1)
    images = _blobs(128, seed=2)
    stats = module.statistics(images, images[:8])
    raw = ae.encode(images)[0].detach()
    assert stats["latent_std"] == pytest.approx(float(raw.std()), rel=1e-4)
    codec = LatentCodec(ae, stats["scale_factor"])
    z = codec.encode(images)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-4)
    assert float(codec.encode(_blobs(128, seed=3)).std()) == pytest.approx(
        1.0, abs=0.15
    )  # held-out images
    assert torch.allclose(codec.decode(z), ae.decode(raw), atol=1e-5)  # decode undoes the scale
    codec.train()
    assert not codec.autoencoder.training  # frozen: stays in eval mode


def test_latent_shape_mismatch_names_the_autoencoder_and_the_keys() -> None:
    codec = LatentCodec(ConvAutoencoder(32, 1, 4, 4, (1, 2, 2)), 1.0, source="ae.ckpt")
    check_latent_shape(codec, 8, 4, "x")
    with pytest.raises(
        ValueError,
        match=r"latent.autoencoder_path=ae.ckpt encodes to 4x8x8 latents but "
        r"latent.channels x latent.resolution\^2 is 4x16x16; set latent.resolution=8",
    ):
        check_latent_shape(codec, 16, 4, "latent.channels x latent.resolution^2")


def test_latent_datamodule_encodes_once_with_mirrored_copies_and_resumes() -> None:
    from cmexp.data import GaussianMixtureDataModule
    from cmexp.data.latent import LatentDataModule

    images = GaussianMixtureDataModule(
        batch_size=4, length=12, resolution=32, channels=3, random_flip=True
    )
    codec = LatentCodec(ConvAutoencoder(32, 3, 4, 4, (1, 2, 2)), 2.0)
    dm = LatentDataModule(images, codec, encode_batch_size=5)
    dm.setup("fit")
    pix = images.train_set.images.float() / 127.5 - 1
    assert dm.train_set.latents.shape == (24, 4, 8, 8)
    assert torch.allclose(dm.train_set.latents[:12], codec.encode(pix), atol=1e-5)
    assert torch.allclose(dm.train_set.latents[12:], codec.encode(pix.flip(-1)), atol=1e-5)
    assert (
        dm.batch_size == 4
        and dm.resolution == 32
        and dm.reference_name == "GaussianMixtureDataModule"
    )
    assert dm.real_images(3).shape == (3, 3, 32, 32)  # the reference data stay images
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and batches[0][0].shape == (4, 4, 8, 8)
    dm.start_batch = 4  # resume: the same batches from there on
    again = list(dm.train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches[4:], strict=True))


class _ConstantLatent(nn.Module):
    """A 'consistency function' on 4x8x8 latents that returns 3 everywhere (outside [-1, 1])."""

    img_resolution, img_channels, label_dim = 8, 4, 0
    sigma_min, sigma_max, sigma_data = 0.002, 80.0, 1.0

    def forward(self, x: torch.Tensor, sigma: object, labels: object = None) -> torch.Tensor:
        return torch.full_like(x, 3.0)


def test_generate_decodes_unclamped_latents() -> None:
    from cmexp.inference import LoadedModel, SamplingSpec, generate

    torch.manual_seed(0)
    codec = LatentCodec(ConvAutoencoder(32, 1, 4, 4, (1, 2, 2)), 0.5)
    spec = SamplingSpec(
        family="consistency",
        sigma_min=0.002,
        sigma_max=80.0,
        rho=7.0,
        num_scales=18,
        taus=(0.585,),
    )
    loaded = LoadedModel(model=_ConstantLatent(), kind="ct", spec=spec, meta={}, latent=codec)
    assert (loaded.img_resolution, loaded.img_channels) == (32, 1)
    out = generate(loaded, 2, [80.0, 0.585], sampler="consistency")
    expected = codec.decode(torch.full((2, 4, 8, 8), 3.0)).clamp(-1, 1)
    assert out.shape == (2, 1, 32, 32) and torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, codec.decode(torch.ones(2, 4, 8, 8)).clamp(-1, 1), atol=1e-3)
