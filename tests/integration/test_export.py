"""`cmexp.export`: slim weights and zoo entries made from a training checkpoint, with the
provenance the run recorded (command, commit, machine, steps, images seen, wall time)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cmexp import zoo
from cmexp.export import export
from cmexp.inference import load_model
from cmexp.train import train

from .conftest import compose_train


@pytest.fixture(scope="module")
def ct_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ct"
    train(compose_train(["debug=tiny", "model=ct", "trainer.max_steps=2"], out))
    return out / "checkpoints" / "last.ckpt"


def test_checkpoints_record_the_runs_provenance_and_wall_time(ct_ckpt: Path) -> None:
    meta = torch.load(ct_ckpt, map_location="cpu", weights_only=True)["cmexp"]
    prov = meta["config"]["provenance"]
    assert prov["command"].startswith("python -m cmexp.train") and "model=ct" in prov["command"]
    assert (
        len(prov["commit"]) == 40
        and prov["machine"]["cores"] == os.cpu_count()
        and prov["machine"]["torch"] == torch.__version__
    )
    assert meta["train_seconds"] > 0


def test_export_slim_and_zoo_entries(
    ct_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    slim = export(
        compose_train(
            [f"ckpt={ct_ckpt}", f"out={tmp_path / 'slim.pt'}"],
            tmp_path / "x",
            config_name="export",
        )
    )
    assert load_model(slim["path"]).spec == load_model(ct_ckpt).spec
    cfg = compose_train(
        [
            f"ckpt={ct_ckpt}",
            "format=zoo",
            "name=tiny_ct",
            "description=a test model",
            "+scores.fd_fmnist_2step=1.5",
        ],
        tmp_path / "y",
        config_name="export",
    )
    out = export(cfg)
    entry = zoo.info("tiny_ct")
    assert entry["kind"] == "ct" and entry["sha256"] == zoo.sha256(out["path"])
    prov = entry["provenance"]
    assert (
        prov["steps"] == 2
        and prov["images_seen"] == 16
        and prov["scores"] == {"fd_fmnist_2step": 1.5}
    )
    assert prov["command"].startswith("python -m cmexp.train") and prov["train_seconds"] > 0
    # the shipped records' schema (tests/unit/test_zoo.py checks every registered model)
    assert (
        prov["file"] == "tiny_ct.pt" and len(prov["git_commit"]) == 40 and prov["seed"] is not None
    )
    assert load_model("zoo:tiny_ct").kind == "ct"  # every ckpt= takes the name
    assert (
        "fmnist_classifier" in json.loads((copy / "zoo.json").read_text())["models"]
    )  # others kept
    with pytest.raises(FileExistsError, match="zoo:tiny_ct exists; pass replace=true"):
        export(cfg)
    with pytest.raises(
        ValueError,
        match="unknown zoo model 'nope'; the zoo has: zoo:fmnist_cd, zoo:fmnist_classifier, zoo:fmnist_ct, zoo:fmnist_edm, zoo:tiny_ct",
    ):
        load_model("zoo:nope")
