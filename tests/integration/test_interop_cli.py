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
from tests.integration.conftest import compose_train

SMALL = {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (8,)}


@pytest.fixture
def edm_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gen = torch.Generator().manual_seed(0)
    pre = ef.precond("VPPrecond", ef.song_unet(16, 3, gen, **SMALL), 16, 3)
    (tmp_path / "models").mkdir()
    path = ef.write_edm_pickle(
        tmp_path / "models" / "edm-tiny-16x16-uncond-vp.pkl", pre, monkeypatch
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
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3)
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
        "net.attn_resolutions=[8]",
        "net.label_dim=0",
        "dataset.resolution=16",
        "trainer.max_steps=2",
    ]
    train(compose_train(overrides, tmp_path / "run"))
    ckpt = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["cmexp"]["kind"] == "cd" and ckpt["cmexp"]["teacher_path"] == str(edm_pickle)
    assert not any(k.startswith(("_teacher", "teacher")) for k in ckpt["state_dict"])
