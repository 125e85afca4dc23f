"""A method is one folder: a training method defined entirely in ``tests/plugin_method`` (EDM
with a log-uniform noise distribution: its loss, LightningModule, config rules, registry record
and YAML files) trains with ``python -m cmexp.train``, samples with ``cmexp.sample``, is loaded
by ``cmexp.eval`` (whose default Fashion-MNIST features refuse its RGB samples in one line) and
gets a one-line error for a bad value of its own config key, while no file under ``cmexp/``
knows it."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugin_method"
SEARCHPATH = f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"


def _run(entry: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", f"cmexp.{entry}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("plugin") / "run"
    out = _run("train", "+experiment=loguniform_edm", SEARCHPATH, f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_nothing_under_cmexp_knows_the_plugin() -> None:
    for f in (ROOT / "cmexp").rglob("*.py"):
        text = f.read_text()
        assert "plugin_method" not in text and "LogUniform" not in text, f


def test_the_plugin_trains_from_the_command_line(trained: Path) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    meta = ckpt["cmexp"]
    assert meta["kind"] == "loguniform_edm" and meta["method_package"] == "tests.plugin_method"
    assert ckpt["global_step"] == 3
    online = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert online, "no online weights in the checkpoint"
    rows = csv.DictReader((trained / "csv" / "metrics.csv").open())
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)  # one per step
    assert (trained / "samples" / "heun7nfe_last.png").is_file()  # the shared sampling path


def test_the_plugin_samples_and_is_scored(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    out = _run("sample", f"ckpt={ckpt}", "num_samples=8", f"hydra.run.dir={tmp_path / 's'}")
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert info["sampler"] == "heun" and info["nfe"] == 7
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (8, 32, 32, 3)
    out = _run(
        "eval",
        f"ckpt={ckpt}",
        "num_samples=16",
        "num_real=16",
        "kid_subset_size=8",
        f"hydra.run.dir={tmp_path / 'e'}",
    )
    # cmexp.eval loads the plug-in's checkpoint through the registry; its samples are RGB
    # (the synthetic 3x32x32 set), which the default features (the Fashion-MNIST classifier)
    # do not score: one line naming features=, nothing written (no Inception weights here)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: features=fmnist_classifier scores 1-channel Fashion-MNIST-like images (28 or 32 "
        f"pixels); the samples of ckpt={ckpt} are 3x32x32: use features=inception (or a feature "
        "classifier of that data)"
    )
    assert not (tmp_path / "e").exists()


def test_a_bad_value_of_its_own_key_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    out = _run(
        "train",
        "+experiment=loguniform_edm",
        SEARCHPATH,
        f"hydra.run.dir={run}",
        "model.loss.sigma_lo=30",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model.loss.sigma_lo=30 must be < model.loss.sigma_hi=20.0"
    ]
    assert not run.exists()
    out = _run(
        "train", "+experiment=loguniform_edm", SEARCHPATH, f"hydra.run.dir={run}",
        "model.loss.sigma_hi=-1",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model.loss.sigma_hi must be a number > 0, got -1"
    ]
    assert not run.exists()
