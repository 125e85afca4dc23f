"""Other code bases' checkpoints through the entry points: ``cmexp.sample`` on an NVlabs/edm
pickle and on an openai/consistency_models CD file, and ``model=cd`` distilling from an EDM
pickle teacher (``model.teacher_path=...pkl``) for two steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import edm_format as ef
from tests.integration.conftest import compose_train, fake_inception_weights

SMALL = {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (16,)}


@pytest.fixture
def edm_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gen = torch.Generator().manual_seed(0)
    # CIFAR-10's shape and EDM's VP file name; DDPM++ shrunk to a few channels
    pre = ef.precond("VPPrecond", ef.song_unet(32, 3, gen, **SMALL), 32, 3)
    (tmp_path / "models").mkdir()
    path = ef.write_edm_pickle(
        tmp_path / "models" / "edm-cifar10-32x32-uncond-vp.pkl", pre, monkeypatch
    )
    for mod in ("torch_utils", "torch_utils.persistence"):
        monkeypatch.delitem(sys.modules, mod)
    return path


def test_sample_an_edm_pickle(edm_pickle: Path, tmp_path: Path) -> None:
    from cmexp.sample import sample

    torch.set_num_threads(1)
    cfg = compose_train(
        [f"ckpt={edm_pickle}", "num_samples=2", "batch_size=2", "solver_steps=2", "device=cpu"],
        tmp_path / "out",
        "sample",
    )
    info = sample(cfg)["info"]
    assert info["kind"] == "edm" and info["sampler"] == "heun" and info["nfe"] == 4  # 2 Heun steps
    assert info["clip_denoised"] is False  # EDM's generate.py does not clamp the denoiser
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, 32, 32, 3)
    assert sorted(p.name for p in edm_pickle.parent.iterdir()) == [edm_pickle.name]


def test_sample_a_consistency_models_file_two_steps(tmp_path: Path) -> None:
    from cmexp.nets import ADMUNet
    from cmexp.sample import sample

    torch.manual_seed(0)
    net = ADMUNet(64, 3, 1000, 32, (1, 2, 3, 4), 1, (8,))
    torch.save(net.state_dict(), tmp_path / "cd_imagenet64_lpips.pt")
    cfg = compose_train(
        [
            f"ckpt={tmp_path / 'cd_imagenet64_lpips.pt'}",
            "num_samples=2",
            "batch_size=2",
            "steps=2",
            "device=cpu",
        ],
        tmp_path / "out",
        "sample",
    )
    info = sample(cfg)["info"]
    assert info["kind"] == "cd" and info["nfe"] == 2
    assert info["clip_denoised"] is True  # image_sample.py's clip_denoised=True
    assert info["sigmas"][1] == pytest.approx(ef_tau(40, 22), rel=1e-6)  # launch.sh --ts 0,22,39


def ef_tau(n: int, i: int) -> float:
    from cmexp.diffusion.karras import karras_sigmas

    return float(karras_sigmas(n, 0.002, 80.0, 7.0, dtype=torch.float64)[i])


def test_distil_from_an_edm_pickle(edm_pickle: Path, tmp_path: Path) -> None:
    """The converted DDPM++ teacher distils into a student of net=edm_ddpmpp shrunk to its size
    (a VP-SDE teacher: the student does not start from its weights)."""
    from cmexp.train import train

    torch.set_num_threads(1)
    overrides = [
        "debug=tiny",
        "model=cd",
        f"model.teacher_path={edm_pickle}",
        "model.init_from_teacher=false",
        "net=edm_ddpmpp",
        "net.model_channels=16",
        "net.channel_mult=[1,2]",
        "net.num_blocks=1",
        "net.attn_resolutions=[16]",
        "net.label_dim=0",
        "dataset.resolution=32",
        "trainer.max_steps=2",
    ]
    train(compose_train(overrides, tmp_path / "run"))
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["cmexp"]["kind"] == "cd" and ckpt["cmexp"]["teacher_path"] == str(edm_pickle)
    assert not any(k.startswith(("_teacher", "teacher")) for k in ckpt["state_dict"])


@pytest.fixture
def cd_file_and_npz(tmp_path: Path) -> tuple[Path, Path]:
    """A consistency_models-style class-conditional CD file (64x64 layout, weights perturbed so
    the network matters) and a downsampled-ImageNet npz folder (train part + val file)."""
    from cmexp.nets import ADMUNet

    torch.manual_seed(0)
    state = ADMUNet(64, 3, 1000, 32, (1, 2, 3, 4), 1, (8,), num_head_channels=32).state_dict()
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    (tmp_path / "models").mkdir()
    torch.save(state, tmp_path / "models" / "cd_imagenet64_lpips.pt")
    data = tmp_path / "imagenet64"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("Imagenet64_train_part1.npz", 12), ("Imagenet64_val_data.npz", 4)):
        np.savez(
            data / name,
            data=rng.integers(0, 255, (n, 12288), dtype=np.uint8),
            labels=rng.integers(1, 1001, n),
        )
    return tmp_path / "models" / "cd_imagenet64_lpips.pt", data


def test_edit_a_consistency_models_file(
    cd_file_and_npz: tuple[Path, Path], tmp_path: Path
) -> None:
    """`cmexp.edit` on a released-style CD file, with ImageNet-64 images from npz files."""
    from cmexp.edit import edit

    torch.set_num_threads(1)
    ckpt, data = cd_file_and_npz
    cfg = compose_train(
        [
            "task=inpaint",
            f"ckpt={ckpt}",
            f"data_dir={data}",
            "num_samples=2",
            "task.num_scales=3",
            "device=cpu",
        ],
        tmp_path / "edit",
        "edit",
    )
    out = edit(cfg)
    metrics, rows = out["metrics"], out["rows"]
    assert metrics["kind"] == "cd" and metrics["num_samples"] == 2 and np.isfinite(metrics["psnr"])
    known = rows["input"] != rows["result"]  # the filled square changed, the rest is the image
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 16:48] = True
    assert known[..., ~mask].sum() == 0 and known[..., mask].float().mean() > 0.9
    assert (tmp_path / "edit" / "edit_inpaint.png").is_file()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


def test_tau_search_a_consistency_models_file(
    cd_file_and_npz: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cmexp.tau_search` on a released-style CD file: its grid (N = 40 as released, here
    num_scales=6 to keep it short), scored against npz ImageNet-64 images in Inception's
    features (a weights file of the real layout with random values; the Fashion-MNIST
    classifier refuses RGB samples)."""
    import json

    from cmexp.tau_search import tau_search

    torch.set_num_threads(1)
    ckpt, data = cd_file_and_npz
    cfg = compose_train(
        [
            f"ckpt={ckpt}",
            f"data_dir={data}",
            "num_samples=4",
            "num_real=8",
            "batch_size=4",
            "num_scales=6",
            "device=cpu",
            f"cache_dir={tmp_path / 'cache'}",
            "features=inception",
            f"features.weights_path={fake_inception_weights(tmp_path / 'inc', monkeypatch)}",
        ],
        tmp_path / "ts",
        "tau_search",
    )
    res = tau_search(cfg)
    assert res["num_scales"] == 6 and len(res["taus"]) == 1 and 1 <= res["tau_indices"][0] <= 4
    saved = json.loads((tmp_path / "ts" / "tau_search.json").read_text())
    scores = [e["fid"] for e in saved["evaluated"]]
    assert res["score"] == min(scores) and len(scores) >= 2 and saved["num_real"] == 8
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]
