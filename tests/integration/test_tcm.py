"""TCM end to end: stage 1 (ECT from a tiny EDM teacher), stage 2 from it, exact resume, DDP,
the inference tools on tcm checkpoints, the CIFAR-10 recipe's values, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import pytest
import torch

from cmexp.inference import load_model
from cmexp.train import train

from .conftest import compose_train, logged_losses, train_single_and_ddp

TINY = ["debug=tiny"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny EDM teacher, then 2 steps of ECT from it: the stage-1 checkpoint."""
    base = tmp_path_factory.mktemp("tcm_stage1")
    train(
        compose_train(
            [*TINY, "model=edm", "trainer.max_steps=2", "model.lr_warmup_kimg=0"], base / "edm"
        )
    )
    edm = base / "edm" / "checkpoints" / "last.ckpt"
    train(
        compose_train(
            [*TINY, "model=ect", f"model.teacher_path={edm}", "trainer.max_steps=2"],
            base / "ect",
        )
    )
    return base / "ect" / "checkpoints" / "last.ckpt"


def _stage2(stage1: Path, *extra: str) -> list[str]:
    return [*TINY, "model=tcm", f"model.stage1_path={stage1}", "model.double_kimg=0.016", *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_stage2_starts_from_stage1_trains_and_samples(composer, stage1: Path) -> None:
    cfg = composer(_stage2(stage1, "trainer.max_steps=3", "model.start_stage=2"))
    model = hydra.utils.instantiate(cfg.model)
    state = _weights(stage1)
    for name, p in model.model.net.named_parameters():  # student, EMA and boundary: stage-1 EMA
        torch.testing.assert_close(p, state[f"ema.net.{name}"])
        torch.testing.assert_close(dict(model.ema.net.named_parameters())[name], p)
        torch.testing.assert_close(dict(model.stage1.net.named_parameters())[name], p)
    assert not any(k.startswith(("_teacher", "teacher")) for k in model.state_dict())
    assert all(not p.requires_grad for p in model.stage1.parameters())

    out = train(cfg)
    trained = out["model"]
    run = Path(cfg.paths.output_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["cmexp"]
    assert meta["kind"] == "tcm" and meta["transition_t"] == 1.0 and meta["taus"] == [1.0]
    assert meta["stage1_path"] == str(stage1)
    assert set(ckpt["state_dict"]) == set(trained.state_dict())  # the stage-1 copy is not saved
    # the boundary model did not move; the student did
    for name, p in trained.stage1.net.named_parameters():
        torch.testing.assert_close(p.cpu(), state[f"ema.net.{name}"])
    moved = [
        not torch.equal(p.cpu(), state[f"ema.net.{n}"])
        for n, p in trained.model.net.named_parameters()
    ]
    assert any(moved)
    import csv

    with open(run / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/stage")]
    assert [float(r["train/stage"]) for r in rows] == [2, 2, 3]  # start_stage + kimg / 0.016
    assert all(float(r["train/boundary_loss"]) >= 0 for r in rows)

    loaded = load_model(run / "checkpoints" / "last.ckpt")
    assert loaded.kind == "tcm" and loaded.family == "consistency"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x, loaded.model.sigma_min), x)  # f(x, eps) = x


def test_stage2_resume_is_exact(composer, stage1: Path) -> None:
    full = composer(_stage2(stage1, "trainer.max_steps=4"), name="full")
    train(full)
    half = composer(_stage2(stage1, "trainer.max_steps=2"), name="half")
    train(half)
    resumed = composer(
        _stage2(
            stage1,
            "trainer.max_steps=4",
            f"ckpt_path={Path(half.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
        ),
        name="resumed",
    )
    train(resumed)
    a = _weights(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt")
    b = _weights(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_stage2_refuses_a_mismatched_stage1(composer, stage1: Path) -> None:
    from .conftest import raises_wrapped_value_error

    cfg = composer(_stage2(stage1, "model/precond=cm", "model.precond.sigma_min=0.003"))
    with raises_wrapped_value_error(r"model.stage1_path=.* is a 'ect' model.*model/precond=ect"):
        hydra.utils.instantiate(cfg.model)
    cfg = composer(_stage2(stage1, "model.precond.sigma_data=0.6"))
    with raises_wrapped_value_error(r"model.stage1_path=.*sigma_data=0.5.*sigma_data=0.6"):
        hydra.utils.instantiate(cfg.model)


def test_cifar10_recipe_has_tcm_values(composer) -> None:
    """conf/experiment/cifar10_tcm{,_stage1}.yaml against NVlabs/TCM README's CIFAR-10 commands
    (and FastGen config_tcm*.py where the README has none)."""
    s2 = composer(["+experiment=cifar10_tcm"])
    m = s2.model
    assert m._target_ == "cmexp.methods.tcm.module.TCMLitModule"
    assert (s2.global_batch_size, s2.dataset.batch_size) == (1024, 1024)
    assert s2.dataset.random_flip is False and s2.net.dropout == 0.2
    assert s2.net._target_ == "cmexp.nets.SongUNet" and s2.net.model_channels == 128
    assert m.transition_t == 1.0 and m.double_kimg == 25600.0 and m.start_stage == 10
    assert m.precond._target_ == "cmexp.diffusion.precond.ECTPrecond"
    assert m.precond.edm_scalings_in_training is True
    loss = m.loss
    assert (loss.time_dist, loss.P_mean, loss.P_std, loss.df) == ("student_t", 0.0, 0.2, 0.01)
    assert (loss.q, loss.k, loss.b, loss.ratio_limit) == (2.0, 8.0, 1.0, 0.999)
    assert (loss.boundary_prob, loss.w_boundary) == (0.25, 0.1)
    assert loss.metric._target_ == "cmexp.losses.PseudoHuberDistance" and loss.metric.c == 1e-8
    assert loss.weighting._target_ == "cmexp.losses.ICTWeighting"
    assert m.optimizer._target_ == "torch.optim.RAdam" and m.optimizer.lr == 5e-5
    assert m.ema_decay == 0.9999 and list(m.taus) == [1.0] and m.lr_warmup_kimg == 0.0
    assert s2.trainer.max_steps == 300000

    s1 = composer(["+experiment=cifar10_tcm_stage1"])
    m1 = s1.model
    assert m1._target_ == "cmexp.methods.ect.module.ECTLitModule"
    assert (s1.global_batch_size, s1.dataset.batch_size) == (512, 512)
    assert s1.dataset.random_flip is False and s1.net.dropout == 0.2
    assert m1.double_kimg == 12800.0 and m1.optimizer.lr == 1e-4 and m1.ema_decay == 0.9999
    assert (m1.loss.P_mean, m1.loss.P_std, m1.loss.q, m1.loss.k) == (-1.1, 2.0, 2.0, 8.0)
    assert m1.loss.metric.c == 1e-8 and list(m1.taus) == [0.821]
    assert s1.trainer.max_steps == 250000
    # stage 2 continues stage 1's stage: 250k iterations x 512 / 12,800 kimg per stage = 10
    assert s1.trainer.max_steps * 512 / 1000 // m1.double_kimg == m.start_stage


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "CMEXP_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_bad_transition_point_ends_with_one_line_and_writes_nothing(
    tmp_path: Path, stage1: Path
) -> None:
    out = _cli(
        "cmexp.train",
        "model=tcm",
        "debug=tiny",
        f"model.stage1_path={stage1}",
        "model.transition_t=90",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: model.transition_t must be in (model.precond.sigma_min, "
        "model.precond.sigma_max) = (0.003, 80.0), got 90"
    ]
    assert "Traceback" not in out.stderr and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_shared_command_lines_sample_eval_tau_search_edit(tmp_path: Path, stage1: Path) -> None:
    """A tcm checkpoint through the shared command lines: cmexp.sample, cmexp.eval (with a tiny
    feature classifier), cmexp.tau_search and cmexp.edit."""
    run = tmp_path / "tcm"
    train(compose_train(_stage2(stage1, "trainer.max_steps=2"), run))
    ckpt = run / "checkpoints" / "last.ckpt"
    clf = tmp_path / "clf"
    train(
        compose_train(
            [
                *TINY,
                "model=classifier",
                "net=small_cnn",
                "net.width=4",
                "net.feature_dim=8",
                "~callbacks.sample_grid",
                "trainer.max_steps=2",
            ],
            clf,
        )
    )
    feats = f"features.ckpt={clf / 'checkpoints' / 'last.ckpt'}"
    outdir = tmp_path / "out"
    common = ["num_real=32", "batch_size=8", f"cache_dir={tmp_path / 'cache'}"]
    steps = [
        ("cmexp.sample", f"ckpt={ckpt}", "num_samples=4", "steps=2", f"hydra.run.dir={outdir}/s"),
        (
            "cmexp.eval",
            f"ckpt={ckpt}",
            feats,
            *common,
            "dataset=gaussian_mixture",
            "num_samples=8",
            "steps=[1,2]",
            f"hydra.run.dir={outdir}/e",
        ),
        (
            "cmexp.tau_search",
            f"ckpt={ckpt}",
            feats,
            "num_samples=8",
            "num_real=32",
            "num_scales=6",
            "steps=2",
            f"hydra.run.dir={outdir}/t",
        ),
        (
            "cmexp.edit",
            f"ckpt={ckpt}",
            "task=inpaint",
            "task.num_scales=4",
            "num_samples=2",
            f"hydra.run.dir={outdir}/d",
        ),
    ]
    for module, *args in steps:
        out = _cli(module, *args, cwd=tmp_path)
        assert out.returncode == 0, f"{module}: {out.stderr[-3000:]}"
    info = json.loads((outdir / "s" / "sample.json").read_text())
    assert info["nfe"] == 2 and info["sigmas"] == [80.0, pytest.approx(1.0)]


class _Report(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vec = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()]).tolist()
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(vec))


@pytest.mark.slow
def test_ddp_step_equals_the_single_process_step(
    tmp_path: Path, stage1: Path, monkeypatch
) -> None:
    """2 processes x 4 images == 1 process x 8 images: the same levels, boundary rows and
    noise (drawn for the global batch and sliced), so the same weights."""

    runs = train_single_and_ddp(
        tmp_path, monkeypatch, _stage2(stage1, "trainer.max_steps=2"), _Report
    )
    results = {
        name: (json.loads((folder / "rank0.json").read_text()), logged_losses(run))
        for name, (folder, run) in runs.items()
    }
    (w1, l1), (w2, l2) = results["single"], results["ddp"]
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert w2 == pytest.approx(w1, abs=1e-5)
