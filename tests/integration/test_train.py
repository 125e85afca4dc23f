"""Tiny end-to-end training runs composed from the real configs (CPU, seconds each)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cmexp.methods.consistency.module import CDLitModule, CTLitModule
from cmexp.utils.errors import NonFiniteLossError
from cmexp.train import train
from cmexp.utils.checks import ConfigError

from .conftest import raises_wrapped_value_error

TINY = ["debug=tiny"]


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        int(r["step"]): float(r["train/loss"]) for r in _metrics(run_dir) if r.get("train/loss")
    }


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EDM teacher trained here on the synthetic set (tiny net, 3 x 32 x 32)."""
    from .conftest import compose_train

    out = tmp_path_factory.mktemp("teacher") / "edm"
    cfg = compose_train([*TINY, "model=edm", "trainer.max_steps=4", "model.lr_warmup_kimg=0"], out)
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def test_edm_teacher_run_writes_checkpoint_grid_and_metrics(teacher_ckpt: Path) -> None:
    run = teacher_ckpt.parents[1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step0000002.ckpt",
        "step0000004.ckpt",
    ]
    assert (run / "samples" / "heun35nfe_last.png").is_file()
    assert (run / "config_resolved.yaml").is_file() and (run / "choices.yaml").is_file()
    rows = _metrics(run)
    assert {"train/loss", "train/kimg"} <= set(rows[0])
    ckpt = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["cmexp"]["kind"] == "edm" and ckpt["cmexp"]["img_resolution"] == 32
    assert ckpt["cmexp"]["config"]["choices"]["model"] == "edm"


def test_cd_from_trained_teacher(composer, teacher_ckpt: Path) -> None:
    cfg = composer(
        [
            *TINY,
            "model=cd",
            f"model.teacher_path={teacher_ckpt}",
            "schedule=fixed",
            "schedule.num_scales=18",
            "solver=heun",
            "metric=l2",
        ]
    )
    out = train(cfg)
    model: CDLitModule = out["model"]
    # the teacher is frozen, in eval mode, and not saved in CD checkpoints
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    run = Path(cfg.paths.output_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("teacher" in k for k in ckpt["state_dict"])
    assert ckpt["cmexp"]["teacher_path"] == str(teacher_ckpt)
    assert {"train/num_scales", "train/mu"} <= set(_metrics(run)[0])
    assert (run / "samples" / "1step_last.png").is_file() and (
        run / "samples" / "2step_last.png"
    ).is_file()


def test_cd_starts_from_teacher_ema_weights(composer, teacher_ckpt: Path) -> None:
    import hydra

    cfg = composer([*TINY, "model=cd", f"model.teacher_path={teacher_ckpt}", "schedule=fixed"])
    model: CDLitModule = hydra.utils.instantiate(cfg.model)
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, p in model.model.net.named_parameters():
        torch.testing.assert_close(p, state[f"ema.net.{name}"])
        torch.testing.assert_close(dict(model.target.net.named_parameters())[name], p)
        torch.testing.assert_close(dict(model.ema.net.named_parameters())[name], p)


def test_ct_run_target_and_sampling_ema_are_distinct_and_follow_their_rates(composer) -> None:
    import hydra

    cfg = composer(
        [
            *TINY,
            "model=ct",
            "schedule=fixed",
            "schedule.num_scales=10",
            "schedule.mu=0.9",
            "model.ema_decay=0.5",
            "trainer.max_steps=1",
        ]
    )
    model: CTLitModule = hydra.utils.instantiate(cfg.model)
    init = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    out = train_with_model(cfg, model)
    # the run trained this very module (else the checks below hold for untouched weights)
    assert out["model"] is model
    assert any(not torch.equal(p, init[n]) for n, p in model.model.named_parameters())
    assert model.target is not model.ema and model.target is not model.model
    for n, p in model.model.named_parameters():
        t = dict(model.target.named_parameters())[n]
        e = dict(model.ema.named_parameters())[n]
        torch.testing.assert_close(t, 0.9 * init[n] + 0.1 * p)
        torch.testing.assert_close(e, 0.5 * init[n] + 0.5 * p)
    assert out["trainer"].global_step == 1


def train_with_model(cfg, model):
    """Run cmexp.train.train but with a pre-built model (to inspect initial weights)."""
    import hydra

    orig = hydra.utils.instantiate

    def fake(node, *a, **k):
        if node is cfg.model:
            return model
        return orig(node, *a, **k)

    hydra.utils.instantiate = fake
    try:
        return train(cfg)
    finally:
        hydra.utils.instantiate = orig


def test_ct_adaptive_logs_curriculum(composer, caplog) -> None:
    cfg = composer(
        [*TINY, "model=ct", "schedule=adaptive", "schedule.s1=20", "trainer.max_steps=4"]
    )
    with caplog.at_level("INFO", logger="cmexp.train"):
        train(cfg)
    # the run states its curriculum and that trainer.max_steps changes it (shortened sweeps)
    assert "schedule: AdaptiveSchedule at k = 0, 1, 2, 3, 4: N = 2, " in caplog.text
    assert (
        "K = trainer.max_steps = 4, so a shorter or longer run changes N(k) and mu(k)"
        in caplog.text
    )
    rows = [r for r in _metrics(Path(cfg.paths.output_dir)) if r.get("train/num_scales")]
    ns = [float(r["train/num_scales"]) for r in rows]
    assert ns[0] == 2 and ns == sorted(ns) and ns[-1] > 2
    assert float(rows[0]["train/mu"]) == pytest.approx(0.81)


#: a 6-step CT run with a checkpoint at step 3 (the resume tests)
_SIX_STEPS_CKPT_AT_3 = [
    *TINY,
    "model=ct",
    "schedule=adaptive",
    "trainer.max_steps=6",
    "callbacks.checkpoint.every_n_train_steps=3",
    "dataset.length=40",
]


def test_resume_reproduces_the_uninterrupted_losses(composer) -> None:
    common = _SIX_STEPS_CKPT_AT_3
    full = composer(common, name="full")
    train(full)
    full_losses = _losses(Path(full.paths.output_dir))
    mid = Path(full.paths.output_dir) / "checkpoints" / "step0000003.ckpt"
    resumed = composer([*common, f"ckpt_path={mid}"], name="resumed")
    out = train(resumed)
    res_losses = _losses(Path(resumed.paths.output_dir))
    assert out["trainer"].global_step == 6
    assert sorted(res_losses) == [3, 4, 5]
    for step, value in res_losses.items():
        assert value == pytest.approx(full_losses[step], rel=1e-5, abs=1e-7), step


def test_resume_into_the_same_folder_keeps_the_earlier_metrics(composer) -> None:
    """Lightning's CSVLogger deletes metrics.csv when its folder is not empty; the suite's
    logger keeps the rows logged before the checkpoint and replaces those after it."""
    common = _SIX_STEPS_CKPT_AT_3
    first = composer(common, name="same")
    train(first)
    run_dir = Path(first.paths.output_dir)
    full_losses = _losses(run_dir)
    assert sorted(full_losses) == [0, 1, 2, 3, 4, 5]
    resumed = composer(
        [*common, f"ckpt_path={run_dir / 'checkpoints' / 'step0000003.ckpt'}"], name="same"
    )
    assert Path(resumed.paths.output_dir) == run_dir
    train(resumed)
    rows = [r for r in _metrics(run_dir) if r.get("train/loss")]
    assert sorted(int(r["step"]) for r in rows) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]  # 0-2 kept, 3-5 logged once more
    for r in rows:
        assert float(r["train/loss"]) == pytest.approx(
            full_losses[int(r["step"])], rel=1e-5, abs=1e-7
        )


def test_fashion_mnist_subset_runs_all_modes(composer, teacher_ckpt: Path) -> None:
    fm = [
        "dataset=fashion_mnist",
        "dataset.subset=32",
        "dataset.batch_size=8",
        "trainer.max_steps=2",
    ]
    edm = composer([*TINY, *fm, "model=edm"], name="fm_edm")
    train(edm)
    ct = composer([*TINY, *fm, "model=ct"], name="fm_ct")
    assert train(ct)["trainer"].global_step == 2
    teacher = Path(edm.paths.output_dir) / "checkpoints" / "last.ckpt"
    cd = composer(
        [*TINY, *fm, "model=cd", f"model.teacher_path={teacher}", "schedule=fixed"], name="fm_cd"
    )
    assert train(cd)["trainer"].global_step == 2


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=cd"], "model.teacher_path is required"),
        (
            ["model=cd", "model.teacher_path=/nonexistent.ckpt"],
            "model.teacher_path=/nonexistent.ckpt: no such checkpoint file",
        ),
        (["schedule=adaptive", "schedule.s1=1"], "schedule.s1=1 must be >= schedule.s0=2"),
        (
            ["model.precond.sigma_min=80", "model.precond.sigma_max=80"],
            "model.precond.sigma_min=80 must be < model.precond.sigma_max=80",
        ),
        (["schedule=fixed", "schedule.mu=1.0"], "schedule.mu must be in [0, 1)"),
        (["schedule=adaptive", "schedule.mu0=-0.1"], "schedule.mu0 must be in [0, 1)"),
    ],
)
def test_config_errors_name_the_key(composer, overrides, message) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        train(composer([*TINY, *overrides]))


def test_teacher_of_wrong_channels_is_rejected(composer, teacher_ckpt: Path) -> None:
    cfg = composer([*TINY, "model=cd", f"model.teacher_path={teacher_ckpt}", "dataset.channels=1"])
    with raises_wrapped_value_error(
        r"^model\.teacher_path=\S+ is a 3-channel 32x32 teacher but this run uses "
        r"dataset\.resolution=32, dataset\.channels=1$"
    ):
        train(cfg)


def test_ct_checkpoint_is_not_a_teacher(composer, tmp_path: Path) -> None:
    ct = composer([*TINY, "model=ct", "trainer.max_steps=2"], name="ct_src")
    train(ct)
    bad = Path(ct.paths.output_dir) / "checkpoints" / "last.ckpt"
    with raises_wrapped_value_error(
        f"^model\\.teacher_path={re.escape(str(bad))} holds a 'ct' model; expected 'edm' here$"
    ):
        train(composer([*TINY, "model=cd", f"model.teacher_path={bad}"]))


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["model.precond.sigma_data=0.6"], ["model.precond.sigma_data=0.6"]),
        (
            ["model.precond.c_noise_scale=250", "model.precond.sigma_max=60"],
            ["model.precond.sigma_max=60", "model.precond.c_noise_scale=250"],
        ),
    ],
)
def test_student_preconditioning_must_match_the_teacher(
    composer, teacher_ckpt: Path, overrides, keys
) -> None:
    """The student starts from the teacher's weights, so it must scale inputs and noise labels
    the same way: every differing key is named, with the teacher's value."""
    cfg = composer(
        [*TINY, "model=cd", f"model.teacher_path={teacher_ckpt}", "schedule=fixed", *overrides]
    )
    with raises_wrapped_value_error(
        f"^model\\.teacher_path={re.escape(str(teacher_ckpt))} was trained with .* but this run "
        "sets .*; the student starts from the teacher's weights: use the teacher's values$"
    ) as err:
        train(cfg)
    for key in keys:
        assert key in str(err.value.__cause__)


def test_existing_run_folder_is_never_overwritten(composer, tmp_path: Path) -> None:
    cfg = composer([*TINY, "model=ct", "trainer.max_steps=2"], name="same")
    train(cfg)
    before = {
        p.name: p.stat().st_mtime_ns
        for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir()
    }
    again = composer([*TINY, "model=ct", "trainer.max_steps=2"], name="same")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(again)
    after = {
        p.name: p.stat().st_mtime_ns
        for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir()
    }
    assert before == after


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(
    composer, monkeypatch
) -> None:
    orig = CTLitModule.compute_loss

    def poisoned(self, images, labels):
        loss, extra = orig(self, images, labels)
        return (loss * float("nan") if self.global_step == 3 else loss), extra

    monkeypatch.setattr(CTLitModule, "compute_loss", poisoned)
    cfg = composer(
        [*TINY, "model=ct", "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2"]
    )
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg)
    ckpt = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def test_last_checkpoint_holds_the_final_step_when_it_is_not_a_checkpoint_step(composer) -> None:
    """5 steps with a checkpoint every 2: last.ckpt is step 5 (Lightning alone left step 4 there,
    and a 1200-step run with checkpoints every 500 lost its last 200 steps)."""
    cfg = composer(
        [*TINY, "model=ct", "trainer.max_steps=5", "callbacks.checkpoint.every_n_train_steps=2"]
    )
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5 and last["cmexp"]["batches_seen"] == 5
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [
        "step0000002.ckpt",
        "step0000004.ckpt",
    ]
    step4 = torch.load(ckpts / "step0000004.ckpt", map_location="cpu", weights_only=False)
    assert any(not torch.equal(v, step4["state_dict"][k]) for k, v in last["state_dict"].items())


def test_wandb_offline_run_logs_metrics_and_uint8_grids(composer, monkeypatch, tmp_path) -> None:
    """Without an API key, logger=wandb logs offline into the run folder (syncable later)."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    logged = []
    orig = WandbLogger.log_image

    def spy(self, key, images, step=None, **kw):
        logged.append((key, images[0]))
        return orig(self, key=key, images=images, step=step, **kw)

    monkeypatch.setattr(WandbLogger, "log_image", spy)
    cfg = composer([*TINY, "model=ct", "logger=wandb", "trainer.max_steps=2"], name="wb")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run in the run folder"
    assert {k for k, _ in logged} == {"samples/1step", "samples/2step"}
    assert all(getattr(img, "dtype", None) in (torch.uint8, np.uint8) for _, img in logged)
    assert (run / "csv" / "metrics.csv").is_file()


def test_cli_training_leaves_exactly_one_run_folder(tmp_path: Path) -> None:
    """`python -m cmexp.train` without hydra.run.dir: the precheck resolves ${now:...} in the run
    folder's name and locks that folder; Hydra must run the job in the same folder, not resolve
    the time again and leave the precheck's folder behind, empty but for its lock."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmexp.train",
            "+experiment=fmnist_ct_pseudo_huber",
            *TINY,
            f"paths.log_dir={tmp_path}",
        ],
        cwd=root,
        env={**os.environ, "CMEXP_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    folders = [p for p in tmp_path.rglob("runs/*") if p.parent.name == "runs"]
    assert len(folders) == 1, sorted(str(p) for p in folders)
    assert (folders[0] / "checkpoints" / "last.ckpt").is_file()
    assert (folders[0] / ".hydra" / "config.yaml").is_file()
