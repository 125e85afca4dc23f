"""openai/consistency_models checkpoints: bare UNetModel state dicts (small fakes with the real
key names, named as released) load strictly onto ADMUNet with the release's preconditioning,
sampling grid and 2-step tau; a missing/extra key or an unknown file name is named."""

from __future__ import annotations

import functools

from pathlib import Path

import pytest
import torch

from cmexp.diffusion.karras import karras_sigmas
from cmexp.inference.loader import load_model
from cmexp.nets import ADMUNet

#: a small net with consistency_models' 64x64 layout: channel_mult (1, 2, 3, 4), attention at 8
SMALL = {
    "model_channels": 32,
    "channel_mult": (1, 2, 3, 4),
    "num_blocks": 1,
    "attn_resolutions": (8,),
}


def _fake(
    path: Path, label_dim: int = 1000, seed: int = 0, res: int = 64, **kw
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = ADMUNet(res, 3, label_dim, **{**SMALL, **kw})
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize(
    ("name", "kind", "wrapper", "num_scales", "tau_index"),
    [
        ("edm_imagenet64_ema.pt", "edm", "EDMPrecond", 40, None),
        ("cd_imagenet64_lpips.pt", "cd", "CMPrecond", 40, 22),
        ("ct_imagenet64.pt", "ct", "CMPrecond", 201, 106),
    ],
)
def test_released_files_load_with_their_settings(
    name: str, kind: str, wrapper: str, num_scales: int, tau_index: int | None, tmp_path: Path
) -> None:
    state = _fake(tmp_path / name)
    before = sorted(p.name for p in tmp_path.iterdir())
    loaded = load_model(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (loaded.kind, type(loaded.model).__name__) == (kind, wrapper)
    m = loaded.model
    assert (m.sigma_min, m.sigma_max, m.sigma_data, m.c_noise_scale) == (0.002, 80.0, 0.5, 250.0)
    assert (loaded.img_resolution, loaded.label_dim, loaded.spec.num_scales) == (
        64,
        1000,
        num_scales,
    )
    if tau_index is None:
        assert loaded.spec.taus == ()
    else:  # scripts/launch.sh --ts 0,22,39 (CD) / 0,106,200 (CT): index 0 = sigma_max
        grid = karras_sigmas(num_scales, 0.002, 80.0, 7.0, dtype=torch.float64)
        assert loaded.spec.taus == pytest.approx((float(grid[tau_index]),))
    assert loaded.net.state_dict().keys() == state.keys()
    assert loaded.spec.clip_denoised is True  # image_sample.py's clip_denoised=True
    # consistency_models' denoise(): c_in, c_skip, c_out from sigma, the UNet at 1000 * 0.25 ln(sigma)
    net = ADMUNet(64, 3, 1000, **SMALL).eval()
    net.load_state_dict(state)
    x, sigma, y = torch.randn(2, 3, 64, 64), torch.tensor([0.01, 20.0]), torch.tensor([7, 999])
    s, sd, eps = sigma[:, None, None, None], 0.5, 0.002
    if kind == "edm":
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    else:
        c_skip, c_out = sd**2 / ((s - eps) ** 2 + sd**2), (s - eps) * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    with torch.no_grad():
        want = c_skip * x + c_out * net(c_in * x, 1000 * 0.25 * torch.log(sigma + 1e-44), y)
        torch.testing.assert_close(loaded.model(x, sigma, y), want, rtol=1e-5, atol=1e-5)


def test_architecture_is_read_from_the_weights(tmp_path: Path) -> None:
    state = _fake(
        tmp_path / "ct_bedroom256.pt",
        label_dim=0,
        res=256,
        use_scale_shift_norm=False,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attn_resolutions=(8,),
        model_channels=16,
    )
    loaded = load_model(tmp_path / "ct_bedroom256.pt")
    cfg = loaded.config["net"]
    assert (cfg["img_resolution"], cfg["channel_mult"], cfg["attn_resolutions"]) == (
        256,
        [1, 1, 2, 2, 4, 4],
        [8],
    )
    assert (cfg["label_dim"], cfg["use_scale_shift_norm"], cfg["num_blocks"]) == (0, False, 1)
    assert loaded.spec.num_scales == 151 and len(loaded.spec.taus) == 1
    # guided-diffusion's 1-D attention convs ([3C, C, 1]) load too
    conv1d = {k: (v[..., 0] if ".qkv." in k and v.ndim == 4 else v) for k, v in state.items()}
    torch.save(conv1d, tmp_path / "cd_bedroom256_l2.pt")
    assert load_model(tmp_path / "cd_bedroom256_l2.pt").kind == "cd"


def test_missing_extra_and_unnamed_files_are_named(tmp_path: Path) -> None:
    state = _fake(tmp_path / "x.pt")
    torch.save(
        {k: v for k, v in state.items() if k != "middle_block.1.qkv.bias"},
        tmp_path / "cd_imagenet64_l2.pt",
    )
    with pytest.raises(
        ValueError, match=r"lacks middle_block\.1\.qkv\.bias, which its architecture needs"
    ):
        load_model(tmp_path / "cd_imagenet64_l2.pt")
    torch.save({**state, "output_blocks.0.0.extra": torch.zeros(1)}, tmp_path / "ct_imagenet64.pt")
    with pytest.raises(ValueError, match=r"has output_blocks\.0\.0\.extra"):
        load_model(tmp_path / "ct_imagenet64.pt")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(
        ValueError, match=r"file name does not say what it is.*edm_\*\.pt = EDM teacher"
    ):
        load_model(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"holds a 'edm' model; expected 'cd' or 'ct'"):
        _fake(tmp_path / "edm_imagenet64_ema.pt")
        load_model(tmp_path / "edm_imagenet64_ema.pt", kinds=("cd", "ct"))


def test_cd_distils_from_the_released_edm_teacher(tmp_path: Path) -> None:
    """``model.teacher_path=edm_imagenet64_ema.pt``: the teacher is the file's ADM network with the
    release's preconditioning (c_noise 250 ln sigma); a CD student of the same architecture starts
    as it (f = D at sigma >> eps) and takes a training step on class-conditional data."""
    from cmexp.diffusion.schedules import FixedSchedule
    from cmexp.diffusion.solvers import heun_step
    from cmexp.methods.consistency.loss import ConsistencyDistillationLoss
    from cmexp.losses.distances import L2Distance
    from cmexp.diffusion.precond import CMPrecond
    from cmexp.methods.consistency.module import CDLitModule

    _fake(tmp_path / "edm_imagenet64_ema.pt", label_dim=10)
    loss = ConsistencyDistillationLoss(metric=L2Distance(), solver=heun_step)
    module = CDLitModule(
        ADMUNet(64, 3, 10, **SMALL),
        loss,
        FixedSchedule(40, 0.0),
        torch.optim.RAdam,
        teacher_path=str(tmp_path / "edm_imagenet64_ema.pt"),
        precond=functools.partial(CMPrecond, c_noise_scale=250.0),
    )
    teacher = load_model(tmp_path / "edm_imagenet64_ema.pt").model
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    sigma = torch.tensor([20.0, 40.0])
    with torch.no_grad():
        # c_skip/c_out of f and D differ by O(eps / sigma) at large sigma
        torch.testing.assert_close(
            module.model(x, sigma, labels), teacher(x, sigma, labels), rtol=1e-3, atol=1e-3
        )
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    value, _ = module.compute_loss(images, labels)
    value.backward()
    assert torch.isfinite(value) and any(p.grad is not None for p in module.model.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "edm_imagenet64_ema.pt"
    ]  # nothing written beside it


def test_released_edm_file_samples_as_image_sample_py(tmp_path: Path) -> None:
    """An openai/consistency_models EDM file samples as its ``image_sample.py --sampler heun``
    (``clip_denoised=True``): the denoiser's output is clamped to [-1, 1] inside every Heun
    step, then the result (``karras_sample``). ``clip_denoised=false`` is EDM's own sampler."""
    from cmexp.diffusion.sampling import SeededNoise
    from cmexp.inference.generate import generate
    from cmexp.inference.plan import solver_plan

    state = _fake(tmp_path / "edm_imagenet64_ema.pt", label_dim=0)
    state["out.2.weight"] = state["out.2.weight"] * 40  # outputs well outside [-1, 1]
    torch.save(state, tmp_path / "edm_imagenet64_ema.pt")
    loaded = load_model(tmp_path / "edm_imagenet64_ema.pt")
    sigmas = [*solver_plan(loaded.spec, 3), 0.0]  # 3 Heun steps and an Euler step into 0
    z = SeededNoise([5]).randn((3, 64, 64))
    sig = torch.tensor(sigmas, dtype=torch.float32)  # get_sigmas_karras: float32
    with torch.no_grad():
        x = z * sig[0]
        for s, s_next in zip(sig[:-1], sig[1:], strict=True):  # karras_diffusion.sample_heun
            s_in = s.expand(1)
            d = (x - loaded.model(x, s_in).clamp(-1, 1)) / s
            x_2 = x + d * (s_next - s)
            if s_next == 0:
                x = x_2
                continue
            d_2 = (x_2 - loaded.model(x_2, s_next.expand(1)).clamp(-1, 1)) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
        want = x.clamp(-1, 1)
    got = generate(loaded, 1, sigmas, seed=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = generate(loaded, 1, sigmas, seed=5, clip_denoised=False)
    assert (plain - got).abs().max() > 1e-2  # the per-step clamp matters here
