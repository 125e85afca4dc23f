"""IMM end to end on the tiny CPU setting: a run trains and resumes exactly, its checkpoints
sample and are scored through the shared command lines (pushforward in 1 and 2 steps, restart
sampling), a bad group size stops the command line on one line, and two DDP processes equal
one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cmexp.train import train

from .conftest import compose_train, logged_losses, train_single_and_ddp

ROOT = Path(__file__).resolve().parents[2]
#: IMM on the tiny net and the synthetic set: 2 groups of 4 per batch of 8
IMM = ["debug=tiny", "model=imm", "net.guidance_embed=true"]
#: a 6-step run with a checkpoint at step 3 (the resume test)
SIX_STEPS = [*IMM, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3"]


def _cli(entry: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", f"cmexp.{entry}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imm") / "full"
    train(compose_train(SIX_STEPS, out))
    return out


def test_a_run_writes_a_self_describing_flow_map_checkpoint(full_run: Path) -> None:
    ckpt = torch.load(full_run / "checkpoints" / "last.ckpt", weights_only=True)
    meta = ckpt["cmexp"]
    assert meta["kind"] == "imm" and meta["method_package"] == "cmexp.methods.imm"
    assert meta["precond"] == {"name": "imm"} and meta["sampler"] == "pushforward"
    assert meta["c_noise_scale"] == 1000.0 and meta["taus"] == [0.7]
    assert ckpt["global_step"] == 6
    losses = _losses(full_run)
    assert sorted(losses) == list(range(6)) and all(np.isfinite(list(losses.values())))


def test_resume_reproduces_the_uninterrupted_losses(full_run: Path, tmp_path: Path) -> None:
    mid = full_run / "checkpoints" / "step0000003.ckpt"
    out = train(compose_train([*SIX_STEPS, f"ckpt_path={mid}"], tmp_path / "resumed"))
    assert out["trainer"].global_step == 6
    full, resumed = _losses(full_run), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5]
    for step, value in resumed.items():
        assert value == pytest.approx(full[step], rel=1e-5, abs=1e-7), step


def test_checkpoint_samples_from_the_command_line(full_run: Path, tmp_path: Path) -> None:
    ckpt = full_run / "checkpoints" / "last.ckpt"
    out = _cli(
        "sample", f"ckpt={ckpt}", "num_samples=6", "steps=2", f"hydra.run.dir={tmp_path / 's'}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert info["sampler"] == "pushforward" and info["nfe"] == 2, info
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8


def test_the_loaded_checkpoint_samples_in_1_and_2_steps_and_with_restarts(full_run: Path) -> None:
    """The shared loader rebuilds the flow map (registered wrapper ``imm``); the shared
    generate draws 1- and 2-step pushforward and restart samples, the same images per seed."""
    from cmexp.inference.generate import generate
    from cmexp.inference.loader import load_model
    from cmexp.inference.plan import nfe, sigma_plan
    from cmexp.methods.imm.precond import IMMPrecond

    loaded = load_model(full_run / "checkpoints" / "last.ckpt")
    assert isinstance(loaded.model, IMMPrecond) and loaded.family == "flow_map"
    one, two = sigma_plan(loaded.spec, 1), sigma_plan(loaded.spec, 2)
    assert two == [pytest.approx(loaded.spec.sigma_max), 0.7]
    assert (nfe(one, "pushforward"), nfe(two, "pushforward")) == (1, 2)
    for plan in (one, two):
        for sampler in ("pushforward", "pushforward_restart"):
            a = generate(loaded, 3, plan, seed=5, batch_size=3, sampler=sampler)
            b = generate(loaded, 3, plan, seed=5, batch_size=2, sampler=sampler)
            assert a.shape == (3, 3, 32, 32) and a.abs().max() <= 1
            assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_is_scored_from_the_command_line(full_run: Path, tmp_path: Path) -> None:
    ckpt = full_run / "checkpoints" / "last.ckpt"
    out = _cli(
        "eval",
        f"ckpt={ckpt}",
        "num_samples=16",
        "num_real=16",
        "kid_subset_size=8",
        "steps=[1,2]",
        f"hydra.run.dir={tmp_path / 'e'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["protocol"]["kind"] == "imm"
    assert {"1step", "2step"} <= set(metrics["metrics"])
    assert metrics["metrics"]["2step"]["fd_fmnist"] > 0


def test_a_group_size_that_does_not_divide_the_batch_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    out = _cli(
        "train", "+experiment=fmnist_imm", "model.loss.group_size=5", f"hydra.run.dir={run}"
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model.loss.group_size=5 must divide dataset.batch_size=64 (the per-device batch "
        "is split into particle groups of this size; a group never straddles batches or devices)"
    ]
    assert not run.exists()


class _Weights(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vec = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()]).tolist()
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(vec))


def test_ddp_step_equals_the_single_process_step(tmp_path: Path, monkeypatch) -> None:
    """2 processes x 4 images (one group each) == 1 process x 8 images (two groups): group
    times and noise are drawn for the global batch and sliced, groups never straddle ranks."""

    runs = train_single_and_ddp(tmp_path, monkeypatch, [*IMM, "trainer.max_steps=3"], _Weights)
    results = {
        name: (json.loads((folder / "rank0.json").read_text()), logged_losses(run))
        for name, (folder, run) in runs.items()
    }
    assert (tmp_path / "rep_ddp" / "rank1.json").is_file()  # two ranks trained
    (w1, l1), (w2, l2) = results["single"], results["ddp"]
    assert len(l1) == 3
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert w2 == pytest.approx(w1, abs=1e-5)
