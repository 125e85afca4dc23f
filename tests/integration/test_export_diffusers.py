"""``python -m cmexp.export format=diffusers``: a tiny ADMUNet consistency model, exported and
loaded with ``diffusers.ConsistencyModelPipeline.from_pretrained`` (offline), samples the same
images as cmexp's Alg. 1 sampler on the same noise, to 1e-5, in 1 step and in 2 steps on the
same levels.

Same noise: diffusers draws image i's initial noise and each step's re-noising from
``generator[i]`` in the order cmexp's :class:`~cmexp.diffusion.sampling.SeededNoise` does, so
``generator=[torch.Generator().manual_seed(seed + i) ...]`` reproduces ``generate(seed=seed)``.
The pipeline returns ``(x + 1) / 2`` in [0, 1]; both samplers clip every denoised step to
[-1, 1] and re-noise with ``sqrt(tau^2 - sigma_min^2) z`` (``s_noise = 1``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmexp.diffusion.sampling import SeededNoise, sample_multistep
from cmexp.export import export
from cmexp.inference import load_model
from cmexp.inference.generate import generate
from cmexp.inference.plan import sigma_plan

from .conftest import compose_train

TOL = 1e-5  # max |cmexp - diffusers| in [-1, 1]


def _perturb(state: dict[str, torch.Tensor], prefix: str, seed: int = 1) -> None:
    """Make every layer matter (zero-initialised output convs would hide most of the net)."""
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.startswith(prefix) and v.is_floating_point():
            state[k] = v + 0.05 * torch.randn(v.shape, generator=g)


@pytest.fixture(scope="module")
def adm_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT checkpoint of `cmexp.train` with a tiny ADMUNet and model.precond.c_noise_scale=250 (2 steps,
    then its sampling-EMA weights perturbed)."""
    from cmexp.train import train

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("diffusers")
    overrides = ["debug=tiny", "model=ct", "trainer.max_steps=2", "dataset.batch_size=2",
                 "net=adm_imagenet64", "dataset.resolution=16", "dataset.num_classes=0",
                 "net.model_channels=32", "net.channel_mult=[1,2]", "net.num_blocks=1",
                 "net.attn_resolutions=[8]", "net.num_head_channels=32", "model.precond.c_noise_scale=250"]  # fmt: skip
    train(compose_train(overrides, base / "run"))
    ckpt = torch.load(
        base / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    _perturb(ckpt["state_dict"], "ema.net.")
    (base / "models").mkdir()
    torch.save(ckpt, base / "models" / "ct_adm.ckpt")
    return base / "models" / "ct_adm.ckpt"


def _pipeline(folder: Path):
    from diffusers import ConsistencyModelPipeline

    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, n: int, seed: int, timesteps: list[int], labels=None) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe(batch_size=n, num_inference_steps=None, timesteps=timesteps, generator=gens,
                  class_labels=labels, output_type="pt").images  # fmt: skip
    return images * 2 - 1


def test_exported_pipeline_samples_like_cmexp(
    adm_ct: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pipe"
    cfg = compose_train(
        [f"ckpt={adm_ct}", "format=diffusers", f"out={out}"], tmp_path / "x", "export"
    )
    assert export(cfg)["path"] == str(out.absolute())
    assert sorted(p.name for p in adm_ct.parent.iterdir()) == ["ct_adm.ckpt"]  # nothing next to it
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "cmexp_export.json", "model_index.json", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".pipe.")
    ]  # no temp folder left
    loaded = load_model(adm_ct)
    pipe = _pipeline(out)
    sched = pipe.scheduler.config
    assert (sched.sigma_min, sched.sigma_max, sched.sigma_data, sched.rho) == (
        0.002,
        80.0,
        0.5,
        7.0,
    )
    assert sched.num_train_timesteps == loaded.spec.num_scales and sched.clip_denoised
    info = json.loads((out / "cmexp_export.json").read_text())
    assert info["plans"]["1step"] == {"sigmas": [80.0], "timesteps": [0]}
    # the CT default tau 0.585 is not a level of its N = 151 grid: no exact diffusers timesteps
    assert info["plans"]["2step"]["timesteps"] is None and info["taus"] == [0.585]

    n, seed, j = 3, 11, 40
    plans = {1: sigma_plan(loaded.spec, 1), 2: sigma_plan(loaded.spec, 2, tau_indices=[j])}
    results = {}
    for steps, timesteps in ((1, [0]), (2, [j, 0])):
        ours = generate(loaded, n, plans[steps], seed=seed, batch_size=n)
        theirs = _diffusers(pipe, n, seed, timesteps)
        err = (ours - theirs).abs().max().item()
        print(f"{steps} step(s), sigmas {plans[steps]}: max |cmexp - diffusers| = {err:.2e}")
        assert err < TOL
        results[steps] = ours
    # not vacuous: the images are not clipped flat, and the second step changed them
    assert (results[2].abs() < 0.99).float().mean() > 0.5
    assert (results[1] - results[2]).abs().max() > 0.1
    other = _diffusers(pipe, n, seed + 1, [j, 0])
    assert (other[0] - results[2][1]).abs().max() < TOL  # image i uses seed + i in both
    assert (other[0] - results[2][0]).abs().max() > 0.1


def test_an_openai_cd_file_exports_with_its_release_timesteps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consistency_models-style class-conditional CD file (64x64 layout, cd_imagenet64 name):
    its 2-step tau is grid[22] of N = 40 (launch.sh --ts 0,22,39), i.e. timesteps [22, 0]; with
    the same labels the pipeline equals cmexp's sampler."""
    from cmexp.nets import ADMUNet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    state = ADMUNet(64, 3, 10, 32, (1, 2, 3, 4), 1, (8,), num_head_channels=32).state_dict()
    _perturb(state, "")
    torch.save(state, tmp_path / "cd_imagenet64_lpips.pt")
    out = tmp_path / "pipe"
    out.mkdir()  # an empty folder is fine
    cfg = compose_train(
        [f"ckpt={tmp_path / 'cd_imagenet64_lpips.pt'}", "format=diffusers", f"out={out}"],
        tmp_path / "x",
        "export",
    )
    export(cfg)
    info = json.loads((out / "cmexp_export.json").read_text())
    assert info["plans"]["2step"]["timesteps"] == [22, 0] and info["num_scales"] == 40
    assert "random labels" in info["class_labels"]
    pipe = _pipeline(out)
    assert pipe.unet.config.num_class_embeds == 10
    loaded = load_model(tmp_path / "cd_imagenet64_lpips.pt")
    n, seed, labels = 2, 5, torch.tensor([3, 7])
    sigmas = sigma_plan(loaded.spec, 2)
    noise = SeededNoise(range(seed, seed + n))
    ours = sample_multistep(
        loaded.model, noise.randn((3, 64, 64)), sigmas, 0.002, labels, noise.randn_like
    )
    theirs = _diffusers(pipe, n, seed, [22, 0], labels)
    err = (ours - theirs).abs().max().item()
    print(f"class-conditional 64x64, 2 steps {sigmas}: max |cmexp - diffusers| = {err:.2e}")
    assert err < TOL


def test_refusals_write_nothing(adm_ct: Path, tmp_path: Path) -> None:
    """A non-empty out= is refused before loading; nothing is left behind by a refused model."""
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = compose_train(
        [f"ckpt={adm_ct}", "format=diffusers", f"out={out}"], tmp_path / "x", "export"
    )
    with pytest.raises(
        ValueError, match=r"exists and is not an empty folder; refusing to overwrite it"
    ):
        export(cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    ckpt = torch.load(adm_ct, map_location="cpu", weights_only=True)
    ckpt["cmexp"]["c_noise_scale"] = 0.25
    torch.save(ckpt, tmp_path / "ct_025.ckpt")
    cfg = compose_train([f"ckpt={tmp_path / 'ct_025.ckpt'}", "format=diffusers", f"out={tmp_path / 'new'}"],
                        tmp_path / "y", "export")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"was trained with c_noise_scale=0.25, but CMStochasticIterative"
    ):
        export(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_025.ckpt", "pipe"]
