"""The inference seam: checkpoints carry every setting needed to use them, one loader reads
every kind, and the command line overrides a recorded setting only when given."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmexp.inference import export_weights, load_model, sigma_plan
from cmexp.train import train

from .conftest import compose_train

TINY = ["debug=tiny"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CT run with non-default rho/taus/fixed N and a tiny EDM run with its sampler N."""
    base = tmp_path_factory.mktemp("inference")
    ct = compose_train(
        [
            *TINY,
            "model=ct",
            "trainer.max_steps=2",
            "model.rho=5.0",
            "model.taus=[1.5,0.3]",
            "schedule=fixed",
            "schedule.num_scales=7",
            "schedule.mu=0.5",
        ],
        base / "ct",
    )
    train(ct)
    edm = compose_train(
        [*TINY, "model=edm", "trainer.max_steps=2", "model.sample_num_scales=6", "model.rho=6.0"],
        base / "edm",
    )
    train(edm)
    return {
        "ct": base / "ct" / "checkpoints" / "last.ckpt",
        "edm": base / "edm" / "checkpoints" / "last.ckpt",
    }


def test_checkpoint_round_trips_every_setting(runs) -> None:
    ct = load_model(runs["ct"])
    assert ct.kind == "ct" and ct.family == "consistency"
    assert (ct.spec.rho, ct.spec.num_scales, ct.spec.taus) == (5.0, 7, (1.5, 0.3))
    assert (ct.spec.sigma_min, ct.spec.sigma_max, ct.sigma_data) == (0.002, 80.0, 0.5)
    assert (ct.img_resolution, ct.img_channels, ct.label_dim) == (32, 3, 0)
    assert ct.dataset["_target_"].endswith("GaussianMixtureDataModule")
    # the default plan is the model's own: [T, *taus], on its rho-5 grid of 7 levels
    assert sigma_plan(ct.spec, 3) == [80.0, 1.5, 0.3]
    grid = sigma_plan(ct.spec, 2, tau_indices=[3])
    expected = (80 ** (1 / 5) + 3 / 6 * (0.002 ** (1 / 5) - 80 ** (1 / 5))) ** 5
    assert grid[1] == pytest.approx(expected, rel=1e-12)
    edm = load_model(runs["edm"])
    assert edm.kind == "edm" and edm.family == "denoiser"
    assert (edm.spec.rho, edm.spec.num_scales) == (6.0, 6)
    assert len(sigma_plan(edm.spec)) == 7 and sigma_plan(edm.spec)[-1] == 0.0


def test_slim_export_loads_with_the_same_settings_and_weights(runs, tmp_path: Path) -> None:
    slim = export_weights(runs["ct"], tmp_path / "slim.pt")
    a, b = load_model(runs["ct"]), load_model(slim)
    assert a.spec == b.spec and a.kind == b.kind
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.model(x, 1.0), b.model(x, 1.0))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export_weights(runs["ct"], slim)


def test_older_checkpoints_without_the_new_fields_still_load(runs, tmp_path: Path) -> None:
    """Checkpoints written before rho/num_scales/taus were recorded: the run config gives them
    (taus from the old key model.sample_sigmas), else the paper's rho = 7 and N = 18."""
    ckpt = torch.load(runs["ct"], map_location="cpu", weights_only=True)
    for key in ("rho", "num_scales", "taus"):
        del ckpt["cmexp"][key]
    model_cfg = ckpt["cmexp"]["config"]["config"]["model"]
    model_cfg["sample_sigmas"] = model_cfg.pop("taus")
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = load_model(tmp_path / "old.ckpt")
    assert (old.spec.rho, old.spec.num_scales, old.spec.taus) == (5.0, 7, (1.5, 0.3))
    del ckpt["cmexp"]["config"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="does not record its net config"):
        load_model(tmp_path / "bare.ckpt")


def test_command_line_overrides_only_when_given_and_says_so(runs, tmp_path: Path, caplog) -> None:
    from cmexp.sample import sample

    cfg = compose_train(
        [f"ckpt={runs['ct']}", "num_samples=2", "steps=2"], tmp_path / "a", config_name="sample"
    )
    with caplog.at_level(logging.WARNING):
        info = sample(cfg)["info"]
    assert info["sigmas"] == [80.0, 1.5] and info["rho"] == 5.0 and info["num_scales"] == 7
    assert "overrides" not in caplog.text
    cfg = compose_train(
        [
            f"ckpt={runs['ct']}",
            "num_samples=2",
            "steps=2",
            "tau_indices=[2]",
            "rho=7",
            "num_scales=7",
        ],
        tmp_path / "b",
        config_name="sample",
    )
    with caplog.at_level(logging.WARNING):
        info = sample(cfg)["info"]
    assert (
        "rho=7.0 overrides the checkpoint's rho=5.0" in caplog.text
        and "num_scales=7 overrides" not in caplog.text
    )
    assert info["rho"] == 7.0


def test_one_loader_refuses_the_wrong_kind_naming_the_key(runs, tmp_path: Path) -> None:
    from cmexp import registry
    from cmexp.inference.checkpoint import read_checkpoint

    with pytest.raises(
        ValueError,
        match=r"ckpt=.* holds a 'edm' model; expected 'cd' or 'ct' or 'ect' or 'sct' or 'scd' or 'tcm' here \(editing\)",
    ):
        load_model(runs["edm"], kinds=registry.kinds("consistency"), purpose="editing")
    with pytest.raises(
        ValueError, match=r"features.ckpt=.* holds a 'ct' model; expected 'classifier'"
    ):
        read_checkpoint(runs["ct"], key="features.ckpt", kinds=("classifier",))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint written by cmexp.train"):
        load_model(tmp_path / "foreign.ckpt")


@pytest.mark.parametrize(
    ("entry", "arg", "new"),
    [
        ("sample", "grid_num_scales=18", "num_scales"),
        ("edit", "num_images=4", "num_samples"),
        ("edit", "split=train", "real_split"),
        ("edit", "lpips_weights_path=/x", "metric.weights_path"),
        ("train", "model.sample_sigmas=[0.5]", "model.taus"),
        ("train", "preset=none", None),
    ],
)
def test_renamed_keys_name_the_new_key(entry: str, arg: str, new: str | None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"cmexp.{entry}", arg],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CMEXP_OFFLINE": "1"},
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    if new is None:  # a removed key says what replaces it
        assert last.startswith(
            f"error: {arg.split('=')[0]} was removed: the main job is +experiment="
        )
    else:
        assert last.startswith(f"error: {arg.split('=')[0]} was renamed: use {new}")
